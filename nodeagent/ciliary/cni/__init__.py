"""Ciliary's CNI plugin (``ciliary-cni``), speaking the CNI specification to kubelet-like runtimes."""
