"""The Kubernetes side of the operator: objects in, status out.

``handlers`` (kopf watch handlers), ``cluster_model`` (the in-memory mirror of
pods, namespaces, nodes and policies that resolution reads) and ``kubeapi``
(the API client and the policy status write). Per-node etcd enrollment:
``enrollment`` (the approval rule), ``node_certificates`` (reading and signing
CSRs, pure) and ``enroller`` (the ``etcd-enroller`` sidecar).
"""
