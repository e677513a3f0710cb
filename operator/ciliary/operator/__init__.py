"""The Ciliary operator: CRD objects in, per-node intents in etcd out.

Pipeline owned here, one package per stage: CiliumNetworkPolicy /
CiliumClusterwideNetworkPolicy objects watched (``kube``) -> validated pydantic
models (``api``) -> pure policy resolution (``policy``) -> per-node intents
(``intents``, driven by ``reconciling``) -> etcd (``store``), and node reports
back into each policy's ``.status`` (``status``).
"""
