"""The pure load-balancing core: Services and EndpointSlices -> one load-balancing intent per node.

Modules, one concept each: ``inputs`` (Service, EndpointSlice and v1 Endpoints bodies parsed into
frozen values), ``errors`` (typed problems a Service can have), ``intent`` (the operator-to-agent wire
schema :class:`~ciliary.operator.services.intent.NodeLBIntent`), ``resolution`` (inputs -> intents)
and ``sharding`` (an intent <-> the shards and manifest stored in etcd).
Nothing here performs I/O or imports kopf, the etcd client, bcc or kubernetes_asyncio.
"""
