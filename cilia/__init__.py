"""cilia: Kubernetes container networking and network policy on eBPF."""

__version__ = "0.1.0"
