"""The local lab: simulated nodes in network namespaces, each with a real agent."""
