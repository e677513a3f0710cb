"""The Kubernetes side of the operator: objects in, status out.

``handlers`` (kopf watch handlers), ``cluster_model`` (the in-memory mirror of
pods, namespaces, nodes and policies that resolution reads) and ``kubeapi``
(the API client and the policy status write).
"""
