//go:build tools

// etcd's server command, imported only so that go.mod and go.sum pin what it needs.
package tools

import _ "go.etcd.io/etcd/server/v3"
