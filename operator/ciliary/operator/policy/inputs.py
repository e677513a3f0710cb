"""The cluster facts policy resolution reads: pods, namespaces and nodes.

The operator shell builds these from its kopf indexes (one frozen value per
object) and hands them, together with a repository snapshot, to
``resolution``. Mappings inside these values are never mutated after
construction; treat them as immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ciliary.operator.api.visibility import VisibilityTuple


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """One ``containerPorts`` item of a pod (only named ones matter to policy)."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What policy needs to know about one pod."""

    namespace: str
    name: str
    uid: str
    node: str | None = None
    ipv4: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    container_ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    """A host-network pod is not an endpoint: its traffic carries the node's identity."""
    visibility: tuple[VisibilityTuple, ...] = ()
    """The ports its proxy-visibility annotation sends through the node's proxy (``policy.visibility``);
    empty when it has none or a refused one."""

    def named_ports(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Port name -> ((protocol, port), ...) of this pod."""
        out: dict[str, list[tuple[str, int]]] = {}
        for cp in self.container_ports:
            if cp.name:
                out.setdefault(cp.name, []).append((cp.protocol.upper(), cp.port))
        return {name: tuple(sorted(set(values))) for name, values in out.items()}


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A namespace and its labels (they become ``io.cilium.k8s.namespace.labels.*``)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node: its InternalIP (host / remote-node in the ipcache) and pod CIDR."""

    name: str
    ipv4: str | None = None
    pod_cidr: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
