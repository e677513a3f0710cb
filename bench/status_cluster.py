"""The cluster the status bench resolves: pods on every simulated node, policies selecting them.

``build`` turns the bench's CNP objects (as the apiserver returned them: real uid
and generation) and ``n`` node names into a ``ClusterState`` for the operator's
own resolver (``ciliary.operator.policy.resolution``): one ``role=web`` pod per
node (``app=v1`` on even nodes, ``app=v2`` on odd ones), so every policy
selects an endpoint on every node and every intent carries real endpoints,
policy entries and the shared ipcache. ``policy(ns, k, value)`` is the CNP the
bench applies: ingress to ``role=web`` from ``app=<value>`` on port 8000+k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ciliary.operator.api.policies import parse_policy
from ciliary.operator.policy.inputs import NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState


def policy(ns: str, k: int, value: str = "v1") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"p-{k}", "namespace": ns},
            "spec": {"endpointSelector": {"matchLabels": {"role": "web"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": value}}],
                                  "toPorts": [{"ports": [{"port": str(8000 + k), "protocol": "TCP"}]}]}]}}


def build(ns: str, nodes: Sequence[str], objects: Sequence[dict[str, Any]]) -> tuple[ClusterState, PolicyRepository]:
    node_infos = {node: NodeInfo(node, f"172.20.{i // 250}.{i % 250 + 1}", pod_cidr=f"10.{64 + i // 256}.{i % 256}.0/24")
                  for i, node in enumerate(nodes)}
    pods = {f"{ns}-web-{i}": PodInfo(namespace=ns, name=f"web-{i}", uid=f"{ns}-web-{i}", node=node,
                                     ipv4=f"10.{64 + i // 256}.{i % 256}.2",
                                     labels={"role": "web", "app": "v1" if i % 2 == 0 else "v2"},
                                     service_account="default")
            for i, node in enumerate(nodes)}
    repo = PolicyRepository()
    for obj in objects:
        repo.upsert(parse_policy(obj))
    return ClusterState(repo.snapshot(), pods, {ns: NamespaceInfo(ns, {"bench": "status"})}, node_infos), repo


def edited(state: ClusterState, repo: PolicyRepository, obj: dict[str, Any], spec: dict[str, Any],
           generation: int) -> ClusterState:
    """``state`` after the object ``obj`` got ``spec`` at ``generation`` (what the operator's watch sees)."""
    repo.upsert(parse_policy({**obj, "metadata": {**obj["metadata"], "generation": generation}, "spec": spec}))
    return replace(state, policies=repo.snapshot())
