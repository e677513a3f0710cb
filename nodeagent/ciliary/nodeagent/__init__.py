"""The Ciliary node agent: one per node.

Watches its node intent in etcd, renders and loads the eBPF datapath, fills its
maps, serves the local endpoint API the CNI plugin calls, and reports status back.
"""
