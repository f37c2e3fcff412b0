"""cilia-agent: the node daemon (endpoints, IPAM, datapath, gRPC API)."""
