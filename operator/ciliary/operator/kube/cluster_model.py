"""The operator's in-memory mirror of the cluster: what policy resolution reads.

kopf's watch handlers feed Kubernetes bodies in; this module turns each into the
frozen inputs of ``policy.inputs`` (parsed once, at the edge), keeps the policy
repository, and raises a ``dirty`` flag the reconciler waits on. It holds no
client: the async shell around it does the I/O.

Secrets: only those the TLS contexts and header matches of published intents name (``wanted_secrets``, set by
the reconciler) are held, decoded (:func:`secret_from_body`); every other Secret event is
dropped unread, so the operator's memory holds no Secret no policy uses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import Any

from ciliary.operator.api import AnyPolicy
from ciliary.operator.api.networkpolicy import NetworkPolicy
from ciliary.operator.api.visibility import pod_visibility
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState

TERMINAL_PHASES = ("Succeeded", "Failed")


def pod_from_body(body: Mapping[str, Any]) -> PodInfo:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    ports = tuple(
        ContainerPort(name=p.get("name", ""), port=int(p["containerPort"]), protocol=p.get("protocol", "TCP"))
        for c in spec.get("containers", []) or [] for p in c.get("ports", []) or []
    )
    ipv4 = next((ip["ip"] for ip in status.get("podIPs", []) or [] if ":" not in ip.get("ip", "")),
                status.get("podIP"))
    return PodInfo(
        namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], node=spec.get("nodeName"),
        ipv4=ipv4 if status.get("phase") not in TERMINAL_PHASES else None,
        labels=dict(meta.get("labels") or {}), service_account=spec.get("serviceAccountName", "") or "",
        container_ports=ports, host_network=bool(spec.get("hostNetwork")),
        visibility=pod_visibility(meta.get("annotations")).tuples,
    )


def namespace_from_body(body: Mapping[str, Any]) -> NamespaceInfo:
    meta = body.get("metadata", {})
    return NamespaceInfo(name=meta["name"], labels=dict(meta.get("labels") or {}))


def node_from_body(body: Mapping[str, Any]) -> NodeInfo:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    ipv4 = next((a["address"] for a in status.get("addresses", []) or [] if a.get("type") == "InternalIP"
                 and ":" not in a.get("address", "")), None)
    return NodeInfo(name=meta["name"], ipv4=ipv4, pod_cidr=spec.get("podCIDR"),
                    labels=dict(meta.get("labels") or {}))


def secret_from_body(body: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's items, decoded (an item that is not base64 is left out: as if missing)."""
    out: dict[str, bytes] = {}
    for item, value in (body.get("data") or {}).items():
        try:
            out[item] = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError):
            continue
    for item, value in (body.get("stringData") or {}).items():  # never in a read object; harmless
        out.setdefault(item, str(value).encode())
    return out


class ClusterModel:
    """Pods, namespaces, nodes and valid policies, plus a change flag."""

    def __init__(self) -> None:
        self.pods: dict[str, PodInfo] = {}
        self.namespaces: dict[str, NamespaceInfo] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.repository = PolicyRepository()
        self.wanted_secrets: set[tuple[str, str]] = set()
        """(namespace, name) of the Secrets TLS contexts of the intents name (the reconciler sets it)."""
        self.secrets: dict[tuple[str, str], Mapping[str, bytes] | None] = {}
        """The wanted Secrets' items as last seen (None: known not to exist)."""
        self.secrets_generation = 0
        """Bumped whenever a held Secret changes."""
        self.dirty = asyncio.Event()

    def _set(self, table: dict[str, Any], key: str, value: Any | None) -> None:
        if value is None:
            if table.pop(key, None) is not None:
                self.dirty.set()
        elif table.get(key) != value:
            table[key] = value
            self.dirty.set()

    def set_pod(self, uid: str, pod: PodInfo | None) -> None:
        self._set(self.pods, uid, pod)

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        self._set(self.namespaces, name, ns)

    def set_node(self, name: str, node: NodeInfo | None) -> None:
        self._set(self.nodes, name, node)

    def set_secret(self, key: tuple[str, str], data: Mapping[str, bytes] | None) -> None:
        """A Secret event (``data`` None: deleted); ignored unless the Secret is wanted."""
        if key not in self.wanted_secrets:
            return
        if key not in self.secrets or self.secrets[key] != data:
            self.secrets[key] = data
            self.secrets_generation += 1
            self.dirty.set()

    def want_secrets(self, wanted: set[tuple[str, str]]) -> None:
        """Hold exactly these Secrets from now on (the others are forgotten)."""
        self.wanted_secrets = set(wanted)
        for key in [k for k in self.secrets if k not in wanted]:
            del self.secrets[key]

    def upsert_policy(self, policy: AnyPolicy | NetworkPolicy) -> None:
        """Raises PolicyInvalidError (repository unchanged) for an invalid policy."""
        before = self.repository.revision
        if self.repository.upsert(policy) != before:
            self.dirty.set()

    def delete_policy(self, uid: str) -> None:
        if uid in self.repository:
            self.repository.delete(uid)
            self.dirty.set()

    def snapshot(self) -> ClusterState:
        return ClusterState(policies=self.repository.snapshot(), pods=dict(self.pods),
                            namespaces=dict(self.namespaces), nodes=dict(self.nodes))
