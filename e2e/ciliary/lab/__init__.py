"""The lab: a real control plane on loopback and nodes, pods and a world host in network namespaces."""
