//go:build tools

// The upstream commands this cluster builds; imported only so that go.mod and go.sum
// pin everything they need. Nothing here is compiled into cilia.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/test/e2e"
	_ "k8s.io/kubernetes/test/images/agnhost"

	// The test runner that runs e2e.test in parallel processes.
	_ "github.com/onsi/ginkgo/v2/ginkgo"
)
