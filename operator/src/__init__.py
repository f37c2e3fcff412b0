"""cilia-operator: the cluster-wide controller (kopf), `cilia.operator.main:main`.

- `identities`: a CiliaIdentity for every security label set in use, GC after a grace.
- `ipam`: a pod CIDR per node from the cluster pool (CiliaNode spec.podCIDRs); the node
  GC of CiliaNodes whose Node is gone.
- `policies`: NetworkPolicy and cilia policy validation (Events, status conditions).
- `leader`: one active replica per coordination.k8s.io Lease.
- `health`, `metrics`: /healthz, /readyz, /metrics.
"""
