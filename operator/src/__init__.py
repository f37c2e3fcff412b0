"""cilia-operator: the cluster-wide controller (kopf). Arrives with issue 4."""
