"""etcd: the one store between the operator and the agents.

``etcdclient`` (connection, mutual TLS, retries), ``keyspace`` (the key layout every
process shares), ``access`` (who may read and write which keys: the etcd roles),
``accounts`` (those roles as etcd users and roles), ``bootstrap`` (a root-run command
creating them and enabling auth), ``publishing`` (node intents written by compare-and-swap),
``identities`` (security identities allocated in etcd) and ``leadership``
(operator leader election and the fence on its writes).
"""
