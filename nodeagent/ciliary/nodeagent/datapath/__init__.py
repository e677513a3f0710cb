"""The eBPF datapath: the only package of Ciliary that imports bcc.

``engine.Datapath`` is what the agent drives (``apply(intent, endpoints)``);
``compiling`` caches compiled programs by rendered-source hash, ``loading``
attaches programs to host veths with tc and pins/adopts bpffs objects,
``maps`` mirrors ``datapath_c/include/types.h`` in ctypes and applies map
diffs, ``flows`` turns the ring buffer into :class:`flows.FlowEvent` objects,
``errors`` holds the typed failures. Importing this package does not import
bcc; its modules do.
"""
