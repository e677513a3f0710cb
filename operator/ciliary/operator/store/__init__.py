"""etcd: the one store between the operator and the agents.

``etcdclient`` (connection, TLS, retries), ``keyspace`` (the key layout every
process shares), ``publishing`` (node intents written by compare-and-swap),
``identities`` (security identities allocated in etcd) and ``leadership``
(operator leader election and the fence on its writes).
"""
