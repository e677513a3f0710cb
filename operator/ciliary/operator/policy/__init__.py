"""The pure policy core: from CiliumNetworkPolicy models to per-node intents.

Modules, one concept each: ``inputs`` (cluster facts), ``selection`` (label
selectors), ``identities`` (security identities), ``compiling`` (policy models
to normalised rules), ``repository`` (valid rules by uid, with a revision),
``named_ports`` (named container ports by identity), ``entries`` (one
endpoint's policy entries), ``resolution`` (rules plus cluster facts to one
``NodeIntent`` per node) and ``tracing`` (``ciliary policy trace``). Nothing
here performs I/O or imports kopf, the etcd client, bcc, kubernetes_asyncio or
pyroute2.
"""
