"""cilia-cni: the CNI plugin, a thin shim that forwards to the node's agent over gRPC."""
