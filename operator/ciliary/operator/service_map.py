"""The service map: Hubble flows -> a graph of workloads and the connections between them (pure: no gRPC, HTTP).

What the graph says, and only that (it is built from the flows the Observer API returned, nothing else):

- a **node** is one security identity: the endpoints whose identity labels are the same (the pods of
  one workload share them; identities are cluster-wide, so both ends of a connection, observed on
  different Ciliary nodes, land on the same graph node). Reserved identities (``reserved:world``,
  ``reserved:host``, ...) are nodes of their own; an endpoint without labels is keyed by identity
  number, then by IP address. Its name: the workload Hubble names, else an app label
  (``app.kubernetes.io/name``, ``k8s-app``, ``app``, ``name``), else the one pod name seen, else the
  reserved entity or CIDR, else its labels (``class=tiefighter, org=empire``), else ``identity N``. Pod names appear only where a flow named them (an agent
  knows the pod names of its own node only);
- an **edge** is (source node, destination node, L4 protocol, destination port) in the direction the
  connection was opened: reply flows (``is_reply``) are left out and counted in ``replies_omitted``.
  ``forwarded`` / ``dropped`` count flow events, not connections: a connection between two pods is
  observed at the source's egress and again at the destination's ingress, and a retransmitted SYN is
  a new event;
- an edge's ``state``: the verdict at the last observation point the edge has (the destination's
  ingress when any flow of the edge was seen there, else the source's egress): ``forwarded`` (all
  forwarded there, and no drop anywhere), ``dropped`` (drops and nothing forwarded there), ``mixed``
  (both). xwing -> deathstar under Cilium's rule1 is ``dropped`` though xwing's egress forwarded it;
- an edge's ``services``: the Services its connections were opened through (``destination_service``: the
  client's node names it, the backend's does not), empty for connections straight to the pods.

:func:`layout` places the nodes in columns by their distance from the sources (pure, deterministic),
so the page only draws.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliary.hubbleapi import flow_pb2, observer_pb2

APP_LABEL_KEYS = ("app.kubernetes.io/name", "k8s-app", "app", "name")
HIDDEN_LABEL_PREFIXES = ("k8s:io.kubernetes.pod.namespace", "k8s:io.cilium.k8s.", "k8s:io.cilium.k8s.namespace.labels",
                         "k8s:io.kubernetes.pod.serviceaccount")
PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6")
RECENT_FLOWS = 50
MAX_PODS_SHOWN = 8
NAME_LABELS = 3
COLUMN_WIDTH, ROW_HEIGHT, MARGIN = 440, 110, 40  # the page's node boxes are 210 x 72


@dataclass
class MapNode:
    id: str
    namespace: str
    kind: str  # "pod" (an identity of pods), "reserved", "cidr", "unknown"
    identity: int
    labels: list[str]
    names: dict[str, None] = field(default_factory=dict)  # hints in order of preference
    pods: dict[str, None] = field(default_factory=dict)
    flows_in: int = 0
    flows_out: int = 0

    def name(self) -> str:
        if self.names:
            return next(iter(self.names))
        if len(self.pods) == 1:
            return next(iter(self.pods))
        if self.labels:
            return ", ".join(label.split(":", 1)[-1] for label in self.labels[:NAME_LABELS])
        return f"identity {self.identity}" if self.identity else self.id.removeprefix("ip:")


@dataclass
class MapEdge:
    source: str
    target: str
    protocol: str
    port: int
    forwarded: int = 0
    dropped: int = 0
    ingress_forwarded: int = 0
    ingress_seen: bool = False
    drop_reasons: dict[str, int] = field(default_factory=dict)
    policies: dict[str, None] = field(default_factory=dict)
    services: dict[str, None] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.source}->{self.target}:{self.protocol}/{self.port}"

    def state(self) -> str:
        """``forwarded``, ``dropped`` or ``mixed`` (module docstring)."""
        delivered = self.ingress_forwarded if self.ingress_seen else self.forwarded
        if self.dropped == 0:
            return "forwarded"
        return "mixed" if delivered else "dropped"


def _label_value(labels: Iterable[str], key: str) -> str | None:
    for label in labels:
        source_key, sep, value = label.partition("=")
        if sep and source_key.split(":", 1)[-1] == key and value:
            return value
    return None


def node_key(endpoint: flow_pb2.Endpoint, ip: str) -> tuple[str, str]:
    """(node id, kind) of an endpoint."""
    labels = sorted(endpoint.labels)
    if any(label.startswith("reserved:") for label in labels):
        cidrs = [label for label in labels if label.startswith("cidr:")]
        if cidrs:
            return "cidr:" + ",".join(c.removeprefix("cidr:").split("=", 1)[0] for c in cidrs), "cidr"
        return "|".join(label.split("=", 1)[0] for label in labels if label.startswith("reserved:")), "reserved"
    if labels:
        return f"{endpoint.namespace}/" + "|".join(labels), "pod"
    if endpoint.identity:
        return f"identity:{endpoint.identity}", "unknown"
    return f"ip:{ip}", "unknown"


def _protocol_port(flow: flow_pb2.Flow) -> tuple[str, int]:
    l4 = flow.l4
    for name in ("TCP", "UDP", "SCTP"):
        if l4.HasField(name):
            return name, int(getattr(l4, name).destination_port)
    for name in ("ICMPv4", "ICMPv6"):
        if l4.HasField(name):
            return name, 0
    return "other", 0


def _shown_labels(labels: Iterable[str]) -> list[str]:
    return sorted(label for label in labels if not label.startswith(HIDDEN_LABEL_PREFIXES))


def _endpoint_text(node: MapNode, pod: str, ip: str) -> str:
    """How the flow table names one end: namespace/pod where the flow named the pod, else the graph node."""
    if pod:
        return f"{node.namespace}/{pod}"
    name = f"{node.namespace}/{node.name()}" if node.kind == "pod" else node.name()
    return f"{name} ({ip})" if ip and name != ip else name


class ServiceMap:
    """Accumulates flows (:meth:`add`) and answers the graph as JSON-ready dicts (:meth:`graph`)."""

    def __init__(self) -> None:
        self.nodes: dict[str, MapNode] = {}
        self.edges: dict[tuple[str, str, str, int], MapEdge] = {}
        self.flows_read = 0
        self.replies_omitted = 0
        self.lost_events = 0
        self.unavailable_nodes: set[str] = set()
        self.recent: collections.deque[tuple[flow_pb2.Flow, str, str, str, int]] = collections.deque(
            maxlen=RECENT_FLOWS)  # (flow, source node, destination node, protocol, port): rows made on demand
        self._keys: dict[tuple[str, tuple[str, ...], int, str], tuple[str, str]] = {}

    def _node(self, endpoint: flow_pb2.Endpoint, ip: str) -> MapNode:
        labels_key = tuple(endpoint.labels)
        memo = (endpoint.namespace, labels_key, endpoint.identity, "" if labels_key or endpoint.identity else ip)
        keyed = self._keys.get(memo)
        if keyed is None:
            keyed = self._keys[memo] = node_key(endpoint, ip)
        key, kind = keyed
        node = self.nodes.get(key)
        if node is None:
            labels = list(endpoint.labels)
            namespace = endpoint.namespace if kind == "pod" else ""
            node = self.nodes[key] = MapNode(key, namespace, kind, int(endpoint.identity), _shown_labels(labels))
            for workload in endpoint.workloads:
                node.names[workload.name] = None
            app = next((v for k in APP_LABEL_KEYS if (v := _label_value(labels, k))), None)
            if app:
                node.names[app] = None
            if kind == "reserved":
                node.names[key.replace("reserved:", "")] = None
            elif kind == "cidr":
                node.names[key.removeprefix("cidr:")] = None
        if endpoint.pod_name:
            node.pods[endpoint.pod_name] = None
        return node

    def add(self, response: observer_pb2.GetFlowsResponse) -> None:
        """One GetFlows answer: a flow, a lost-events notice or a node-status event."""
        if response.HasField("lost_events"):
            self.lost_events += int(response.lost_events.num_events_lost)
            return
        if response.HasField("node_status"):
            self.unavailable_nodes.update(response.node_status.node_names)
            return
        if response.HasField("flow"):
            self.add_flow(response.flow)

    def add_flow(self, flow: flow_pb2.Flow) -> None:
        self.flows_read += 1
        if flow.is_reply.value if flow.HasField("is_reply") else flow.reply:
            self.replies_omitted += 1
            return
        src_ip, dst_ip = flow.IP.source, flow.IP.destination
        src, dst = self._node(flow.source, src_ip), self._node(flow.destination, dst_ip)
        protocol, port = _protocol_port(flow)
        key = (src.id, dst.id, protocol, port)
        edge = self.edges.get(key)
        if edge is None:
            edge = self.edges[key] = MapEdge(src.id, dst.id, protocol, port)
        dropped = flow.verdict == flow_pb2.DROPPED
        ingress = flow.traffic_direction == flow_pb2.INGRESS
        if dropped:
            edge.dropped += 1
            reason = flow_pb2.DropReason.Name(flow.drop_reason_desc) if flow.drop_reason_desc else "UNKNOWN"
            edge.drop_reasons[reason] = edge.drop_reasons.get(reason, 0) + 1
        else:
            edge.forwarded += 1
        if ingress:
            edge.ingress_seen = True
            edge.ingress_forwarded += not dropped
        for policy in (*flow.ingress_allowed_by, *flow.egress_allowed_by, *flow.ingress_denied_by,
                       *flow.egress_denied_by):
            edge.policies[f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name] = None
        if flow.HasField("destination_service"):
            service = flow.destination_service
            edge.services[f"{service.namespace}/{service.name}" if service.namespace else service.name] = None
        src.flows_out += 1
        dst.flows_in += 1
        self.recent.append((flow, src.id, dst.id, protocol, port))

    def graph(self) -> dict[str, Any]:
        positions = layout(self.nodes, [(e.source, e.target) for e in self.edges.values()])
        nodes = []
        for node in sorted(self.nodes.values(), key=lambda n: (n.namespace, n.name(), n.id)):
            x, y = positions[node.id]
            pods = sorted(node.pods)
            nodes.append({"id": node.id, "name": node.name(), "namespace": node.namespace, "kind": node.kind,
                          "identity": node.identity, "labels": node.labels, "pods": pods[:MAX_PODS_SHOWN],
                          "pods_more": max(0, len(pods) - MAX_PODS_SHOWN), "flows_in": node.flows_in,
                          "flows_out": node.flows_out, "x": x, "y": y})
        edges = [{"id": e.id, "source": e.source, "target": e.target, "protocol": e.protocol, "port": e.port,
                  "forwarded": e.forwarded, "dropped": e.dropped, "state": e.state(),
                  "drop_reasons": dict(sorted(e.drop_reasons.items())), "policies": sorted(e.policies),
                  "services": sorted(e.services)}
                 for e in sorted(self.edges.values(), key=lambda e: e.id)]
        return {"nodes": nodes, "edges": edges, "namespaces": sorted({n.namespace for n in self.nodes.values()
                                                                      if n.namespace}),
                "flows_read": self.flows_read, "replies_omitted": self.replies_omitted,
                "lost_events": self.lost_events, "unavailable_nodes": sorted(self.unavailable_nodes),
                "recent_flows": [self._row(*row) for row in reversed(self.recent)]}

    def _row(self, flow: flow_pb2.Flow, src: str, dst: str, protocol: str, port: int) -> dict[str, Any]:
        """A recent flow for the table, its ends named as the graph knows them now (a later flow may have
        named a pod)."""
        dropped = flow.verdict == flow_pb2.DROPPED
        return {"time": flow.time.ToJsonString() if flow.HasField("time") else "", "node": flow.node_name,
                "source": _endpoint_text(self.nodes[src], flow.source.pod_name, flow.IP.source),
                "destination": _endpoint_text(self.nodes[dst], flow.destination.pod_name, flow.IP.destination),
                "protocol": protocol, "port": port, "verdict": flow_pb2.Verdict.Name(flow.verdict),
                "drop_reason": flow_pb2.DropReason.Name(flow.drop_reason_desc) if dropped else "",
                "direction": flow_pb2.TrafficDirection.Name(flow.traffic_direction), "summary": flow.Summary}


def build(responses: Iterable[observer_pb2.GetFlowsResponse]) -> dict[str, Any]:
    """The graph of ``responses`` (GetFlows answers, in any order)."""
    service_map = ServiceMap()
    for response in responses:
        service_map.add(response)
    return service_map.graph()


def layout(nodes: Mapping[str, MapNode], edges: Iterable[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """(x, y) of every node: column = longest path from a node nobody connects to (cycles broken by
    the iteration bound), rows ordered by (namespace, name) within a column."""
    incoming: dict[str, set[str]] = {key: set() for key in nodes}
    for source, target in edges:
        if source != target and source in nodes and target in nodes:
            incoming[target].add(source)
    rank = dict.fromkeys(nodes, 0)
    for _ in range(len(nodes)):  # at most |nodes| rounds (longest simple path); a cycle stops growing here
        changed = False
        for key, sources in incoming.items():
            best = max((rank[s] + 1 for s in sources), default=0)
            if best > rank[key] and best < len(nodes):
                rank[key], changed = best, True
        if not changed:
            break
    columns: dict[int, list[MapNode]] = {}
    for key, node in nodes.items():
        columns.setdefault(rank[key], []).append(node)
    positions = {}
    for column, (_, members) in enumerate(sorted(columns.items())):
        for row, node in enumerate(sorted(members, key=lambda n: (n.kind != "pod", n.namespace, n.name(), n.id))):
            positions[node.id] = (MARGIN + column * COLUMN_WIDTH, MARGIN + row * ROW_HEIGHT)
    return positions
