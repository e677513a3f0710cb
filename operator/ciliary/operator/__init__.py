"""The Ciliary operator: CRD objects in, per-node intents in etcd out.

Pipeline owned here: CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy objects
-> validated pydantic models (``api``) -> pure policy resolution (``policy``)
-> per-node intents (``intents``) -> etcd (``publishing``), and node reports back
into each policy's ``.status`` (``handover``).
"""
