"""The eBPF datapath: the only package of Ciliary that imports bcc, and only in a child process.

``engine.Datapath`` is what the agent drives (``apply(intent, endpoints)``);
``compiling`` compiles rendered programs in a short-lived child process
(``compiler``, the one module importing bcc) that pins each verified program in
bpffs under its rendered-source hash; ``loading`` attaches programs to host veths
with tc and adopts bpffs pins; ``maps`` mirrors ``datapath_c/include/types.h`` in
ctypes and applies map diffs; ``flows`` turns the ring buffer into
:class:`flows.FlowEvent` objects; ``libbpf`` binds the system libbpf the agent
uses for all of that; ``errors`` holds the typed failures. The agent process
never loads bcc (its LLVM libraries alone cost ~55 MB resident).
"""
