"""Property tests: resolution + evaluate_entries agree with a direct, per-packet reading of the policies.

The reference evaluator below works on the raw policy dicts and the pods; it
knows nothing of identities, selector caches or policy entries. It encodes the
documented semantics (see ``ciliary.operator.policy.entries``) in the plainest
possible way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.api.errors import PolicyError
from ciliary.operator.api.policies import parse_policy
from ciliary.operator.intents import NodeIntent
from ciliary.operator.policy import tracing
from ciliary.operator.policy.identities import InMemoryIdentityAllocator
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState, Resolver, resolve_cluster

NAMESPACES = ["a", "b", "c"]
NODE_IPS = {"n1": "192.168.0.1", "n2": "192.168.0.2", "n3": "192.168.0.3"}
EXTERNAL = ["8.8.8.8", "8.8.4.4", "172.20.1.1", "172.17.0.1", "1.1.1.1", "10.99.0.1"]
APP_PORTS = {"web": (("http", 8080, "TCP"),), "db": (("pg", 5432, "TCP"), ("dns", 53, "UDP")), "cli": ()}
CIDRS = {
    "172.16.0.0/12": ["172.20.0.0/16"],
    "172.20.0.0/16": [],
    "8.8.8.0/24": ["8.8.8.8/32"],
    "0.0.0.0/0": ["172.16.0.0/12", "8.8.4.4/32"],
    "10.0.0.0/8": ["10.0.1.0/24"],
}
PORT_CHOICES = ["80", "443", "5432", "8080", "53", "0", "http", "pg", "dns"]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- generators

label_values = {"app": ["web", "db", "cli"], "env": ["prod", "dev"], "tier": ["x"]}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]]:
    namespaces = {n: NamespaceInfo(n, {"team": draw(st.sampled_from(["red", "blue"]))}) for n in NAMESPACES}
    nodes = {n: NodeInfo(n, ip) for n, ip in NODE_IPS.items()}
    pods: dict[str, PodInfo] = {}
    for i in range(draw(st.integers(2, 7))):
        ns = draw(st.sampled_from(NAMESPACES))
        node = draw(st.sampled_from(sorted(NODE_IPS)))
        labels = {k: draw(st.sampled_from(v)) for k, v in label_values.items() if draw(st.booleans())}
        if draw(st.booleans()):
            labels["pod-template-hash"] = f"h{i}"
        if node == "n1" and draw(st.booleans()):
            labels["pin"] = "yes"
        ports = tuple(ContainerPort(n, p, pr) for n, p, pr in APP_PORTS.get(labels.get("app", ""), ()))
        sa = draw(st.sampled_from(["", "sa1"]))
        pods[f"u{i}"] = PodInfo(ns, f"p{i}", f"u{i}", node, f"10.0.{node[1]}.{i + 1}", labels, sa, ports)
    return namespaces, nodes, pods


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 2))):
        choice = draw(st.sampled_from(["app", "k8s:app", "any:env", "ns", "nslabel", "reserved", "sa"]))
        if choice == "ns":
            labels["k8s:io.kubernetes.pod.namespace"] = draw(st.sampled_from(NAMESPACES))
        elif choice == "nslabel":
            labels["io.cilium.k8s.namespace.labels.team"] = draw(st.sampled_from(["red", "blue"]))
        elif choice == "reserved":
            labels[draw(st.sampled_from(["reserved:host", "reserved:world", "reserved:remote-node"]))] = ""
        elif choice == "sa":
            labels["io.cilium.k8s.policy.serviceaccount"] = "sa1"
        else:
            key = choice.split(":")[-1]
            labels[choice] = draw(st.sampled_from(label_values[key]))
    if labels:
        out["matchLabels"] = labels
    expressions = []
    for _ in range(draw(st.integers(0, 1))):
        key = draw(st.sampled_from(["app", "k8s:env", "tier"]))
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        expr: dict[str, Any] = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            values = label_values[key.split(":")[-1]]
            expr["values"] = draw(st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True))
        expressions.append(expr)
    if expressions:
        out["matchExpressions"] = expressions
    return out


@st.composite
def port_rules(draw: st.DrawFn) -> list[dict[str, Any]]:
    ports = []
    for _ in range(draw(st.integers(1, 2))):
        port = draw(st.sampled_from(PORT_CHOICES))
        entry: dict[str, Any] = {"port": port}
        proto = draw(st.sampled_from([None, "TCP", "UDP", "ANY"]))
        if proto:
            entry["protocol"] = proto
        if port.isdigit() and port != "0" and draw(st.booleans()):
            entry["endPort"] = int(port) + draw(st.integers(0, 10))
        ports.append(entry)
    return [{"ports": ports}]


@st.composite
def items(draw: st.DrawFn, direction: str, deny: bool) -> dict[str, Any]:
    peer = "from" if direction == "ingress" else "to"
    item: dict[str, Any] = {}
    for kind in draw(st.lists(st.sampled_from(["endpoints", "entities", "cidr"]), max_size=2, unique=True)):
        if kind == "endpoints":
            item[f"{peer}Endpoints"] = draw(st.lists(selectors(), min_size=1, max_size=2))
        elif kind == "entities":
            entities = ["world", "cluster", "host", "remote-node", "all", "init"]
            item[f"{peer}Entities"] = draw(st.lists(st.sampled_from(entities), min_size=1, max_size=2, unique=True))
        else:
            cidr = draw(st.sampled_from(sorted(CIDRS)))
            excepts = draw(st.lists(st.sampled_from(CIDRS[cidr]), unique=True)) if CIDRS[cidr] else []
            item[f"{peer}CIDRSet"] = [{"cidr": cidr, "except": excepts}] if excepts else [{"cidr": cidr}]
    if not deny and draw(st.integers(0, 4)) == 0:
        item[f"{peer}Requires"] = [draw(selectors())]
    if draw(st.booleans()):
        item["toPorts"] = draw(port_rules())
    if draw(st.integers(0, 4)) == 0:
        item["icmps"] = [{"fields": [{"type": draw(st.sampled_from([0, 8, "EchoRequest"]))}]}]
    return item


@st.composite
def rules(draw: st.DrawFn, subject: dict[str, Any] | None = None, cidrs: bool = True) -> dict[str, Any]:
    rule: dict[str, Any] = {"endpointSelector": subject if subject is not None else draw(selectors())}
    for section in draw(st.lists(st.sampled_from(["ingress", "egress", "ingressDeny", "egressDeny"]),
                                 min_size=1, max_size=3, unique=True)):
        direction = section.removesuffix("Deny")
        drawn = draw(st.lists(items(direction, section.endswith("Deny")), max_size=2))
        if not cidrs:
            drawn = [{k: v for k, v in i.items() if "CIDR" not in k} for i in drawn]
        rule[section] = drawn
    if draw(st.integers(0, 5)) == 0:
        rule["enableDefaultDeny"] = {draw(st.sampled_from(["ingress", "egress"])): False}
    return rule


@st.composite
def policies(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        clusterwide = draw(st.booleans())
        meta: dict[str, Any] = {"name": f"pol{i}", "uid": f"uid{i}"}
        if not clusterwide:
            meta["namespace"] = draw(st.sampled_from(NAMESPACES))
        body: dict[str, Any] = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy" if clusterwide else "CiliumNetworkPolicy",
            "metadata": meta,
            "spec": draw(rules()),
        }
        if draw(st.integers(0, 3)) == 0:
            body["specs"] = [draw(rules())]
        out.append(body)
    return out


def build_state(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]], bodies: list[dict[str, Any]]
) -> tuple[ClusterState, list[dict[str, Any]]]:
    repo = PolicyRepository()
    accepted = []
    for body in bodies:
        try:
            repo.upsert(parse_policy(body))
        except PolicyError:
            continue
        accepted.append(body)
    namespaces, nodes, pods = cluster
    return ClusterState(repo.snapshot(), pods, namespaces, nodes), accepted


# ------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Peer:
    kind: str  # pod, host, remote-node, world
    ip: str
    labels: frozenset[tuple[str, str, str]] = frozenset()  # (source, key, value)
    pod: PodInfo | None = None


def pod_security_labels(pod: PodInfo, namespaces: dict[str, NamespaceInfo]) -> frozenset[tuple[str, str, str]]:
    out = {("k8s", k, v) for k, v in pod.labels.items() if k != "pod-template-hash"}
    out.add(("k8s", "io.kubernetes.pod.namespace", pod.namespace))
    out |= {("k8s", "io.cilium.k8s.namespace.labels." + k, v) for k, v in namespaces[pod.namespace].labels.items()}
    if pod.service_account:
        out.add(("k8s", "io.cilium.k8s.policy.serviceaccount", pod.service_account))
    out.add(("k8s", "io.cilium.k8s.policy.cluster", "default"))
    return frozenset(out)


def peer_seen_from(ip: str, node: str, state: ClusterState) -> Peer:
    for pod in state.pods.values():
        if pod.ipv4 == ip:
            return Peer("pod", ip, pod_security_labels(pod, dict(state.namespaces)), pod)
    if ip == NODE_IPS[node]:
        return Peer("host", ip, frozenset({("reserved", "host", "")}))
    if ip in NODE_IPS.values():
        return Peer("remote-node", ip, frozenset({("reserved", "remote-node", "")}))
    return Peer("world", ip, frozenset({("reserved", "world", "")}))


def split(key: str) -> tuple[str, str]:
    return (key.split(":", 1)[0], key.split(":", 1)[1]) if ":" in key else ("any", key)


def requirement_holds(key: str, op: str, values: list[str], labels: frozenset[tuple[str, str, str]]) -> bool:
    source, name = split(key)
    present = [v for s, k, v in labels if k == name and (source == "any" or s == source)]
    if op == "In":
        return any(v in values for v in present)
    if op == "NotIn":
        return all(v not in values for v in present)
    if op == "Exists":
        return bool(present)
    return not present


def requirements(selector: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    out = [(k, "In", [v]) for k, v in (selector.get("matchLabels") or {}).items()]
    out += [(e["key"], e["operator"], e.get("values") or []) for e in selector.get("matchExpressions") or []]
    return out


def is_namespace_key(key: str) -> bool:
    return split(key)[1] == "io.kubernetes.pod.namespace" and split(key)[0] in ("k8s", "any")


def subject_selects(selector: dict[str, Any], ns: str, pod: Peer) -> bool:
    reqs = requirements(selector)
    if ns:
        if pod.pod is None or pod.pod.namespace != ns:
            return False
        reqs = [r for r in reqs if not is_namespace_key(r[0])]
    return all(requirement_holds(k, op, v, pod.labels) for k, op, v in reqs)


def peer_selects(selector: dict[str, Any], ns: str, peer: Peer) -> bool:
    reqs = requirements(selector)
    names_ns = any(is_namespace_key(k) for k, _, _ in reqs)
    reserved = any(split(k)[0] == "reserved" for k, _, _ in reqs)
    if not names_ns and not reserved:
        if peer.pod is None:
            return False
        ns_labels = any(split(k)[1].startswith("io.cilium.k8s.namespace.labels.") for k, _, _ in reqs)
        if ns and not ns_labels and peer.pod.namespace != ns:
            return False
    return all(requirement_holds(k, op, v, peer.labels) for k, op, v in reqs)


def entity_matches(entity: str, peer: Peer) -> bool:
    return entity == "all" or {
        "world": peer.kind == "world",
        "cluster": peer.kind in ("pod", "host", "remote-node"),
        "host": peer.kind == "host",
        "remote-node": peer.kind == "remote-node",
    }.get(entity, False)


def cidr_matches(rule: dict[str, Any], peer: Peer) -> bool:
    if peer.kind != "world":
        return False
    ip = ipaddress.IPv4Address(peer.ip)
    inside = ip in ipaddress.IPv4Network(rule["cidr"])
    return inside and not any(ip in ipaddress.IPv4Network(e) for e in rule.get("except") or [])


def named_port_numbers(name: str, proto: str, pods: list[PodInfo]) -> set[tuple[str, int]]:
    return {(cp.protocol, cp.port) for p in pods for cp in p.container_ports if cp.name == name}


def port_matches(item: dict[str, Any], packet: tuple[str, int], named_source: list[PodInfo]) -> bool:
    proto, port = packet
    for port_rule in item.get("toPorts") or []:
        for entry in port_rule.get("ports") or []:
            declared = entry.get("protocol") or "ANY"
            protocols = {"TCP", "UDP", "SCTP"} if declared == "ANY" else {declared}
            if proto not in protocols:
                continue
            value = entry["port"]
            if value.isdigit():
                low = int(value)
                high = max(low, entry.get("endPort") or 0)
                if low == 0 or low <= port <= high:
                    return True
            elif (proto, port) in named_port_numbers(value, proto, named_source):
                return True
    names = {"EchoRequest": 8, "EchoReply": 0}
    for icmp in item.get("icmps") or []:
        for field in icmp.get("fields") or []:
            wanted = names.get(field["type"], field["type"])
            if proto == "ICMP" and port == int(wanted):
                return True
    return False


def item_matches(
    item: dict[str, Any], ns: str, direction: str, endpoint: Peer, peer: Peer, packet: tuple[str, int],
    requires: list[tuple[dict[str, Any], str]], state: ClusterState,
) -> bool:
    side = "from" if direction == "ingress" else "to"
    endpoints = item.get(f"{side}Endpoints") or []
    entities = item.get(f"{side}Entities") or []
    cidrs = item.get(f"{side}CIDRSet") or []
    has_l3 = bool(endpoints or entities or cidrs)
    has_l4 = bool(item.get("toPorts") or item.get("icmps"))
    if not has_l3 and not has_l4:
        return False
    if has_l3:
        ok = any(
            peer_selects(s, ns, peer) and all(peer_selects(r, r_ns, peer) for r, r_ns in requires) for s in endpoints
        ) or any(entity_matches(e, peer) for e in entities) or any(cidr_matches(c, peer) for c in cidrs)
        if not ok:
            return False
    if not has_l4:
        return True
    if direction == "ingress":
        named_source = [endpoint.pod] if endpoint.pod else []
    else:
        # the destination's own ports, whatever selected it (an L4-only item too): those of the pods
        # sharing its identity; a non-pod destination (world, CIDR, host, remote node) has none
        pods = state.pods.values()
        named_source = [p for p in pods if pod_security_labels(p, dict(state.namespaces)) == peer.labels]
    return port_matches(item, packet, named_source)


def reference_direction(
    bodies: list[dict[str, Any]], state: ClusterState, direction: str, endpoint: Peer, peer: Peer,
    packet: tuple[str, int],
) -> bool:
    selecting = []
    for body in bodies:
        ns = body["metadata"].get("namespace", "") if body["kind"] == "CiliumNetworkPolicy" else ""
        for rule in [body.get("spec")] + list(body.get("specs") or []):
            if rule and subject_selects(rule["endpointSelector"], ns, endpoint):
                if rule.get(direction) or rule.get(direction + "Deny"):
                    selecting.append((ns, rule))
    if not selecting:
        return True
    default_deny = any((r.get("enableDefaultDeny") or {}).get(direction) is not False for _, r in selecting)
    key = "fromRequires" if direction == "ingress" else "toRequires"
    requires = [(s, ns) for ns, r in selecting for section in (direction, direction + "Deny")
                for item in r.get(section) or [] for s in item.get(key) or []]
    for ns, rule in selecting:
        for item in rule.get(direction + "Deny") or []:
            if item_matches(item, ns, direction, endpoint, peer, packet, [], state):
                return False
    for ns, rule in selecting:
        for item in rule.get(direction) or []:
            if item_matches(item, ns, direction, endpoint, peer, packet, requires, state):
                return True
    if direction == "ingress" and peer.kind == "host":
        return True
    return not default_deny


def reference(bodies: list[dict[str, Any]], state: ClusterState, src: str, dst: str, packet: tuple[str, int]) -> bool:
    by_ip = {p.ipv4: p for p in state.pods.values()}
    src_pod, dst_pod = by_ip.get(src), by_ip.get(dst)
    ok = True
    if src_pod is not None and src_pod.node:
        me = peer_seen_from(src, src_pod.node, state)
        ok &= reference_direction(bodies, state, "egress", me, peer_seen_from(dst, src_pod.node, state), packet)
    if dst_pod is not None and dst_pod.node:
        me = peer_seen_from(dst, dst_pod.node, state)
        ok &= reference_direction(bodies, state, "ingress", me, peer_seen_from(src, dst_pod.node, state), packet)
    return ok


# ---------------------------------------------------------------------------- properties

PACKETS = [("TCP", 80), ("TCP", 443), ("TCP", 5432), ("TCP", 8080), ("UDP", 53), ("UDP", 80), ("TCP", 85),
           ("SCTP", 80), ("ICMP", 8), ("ICMP", 0), ("TCP", 5440), ("UDP", 5432)]


@SETTINGS
@given(cluster=clusters(), bodies=policies(), data=st.data())
def test_trace_agrees_with_reference(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]],
    bodies: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    state, accepted = build_state(cluster, bodies)
    intents = resolve_cluster(state)
    addresses = [p.ipv4 or "" for p in state.pods.values()] + EXTERNAL[:3] + list(NODE_IPS.values())[:2]
    pod_ips = [p.ipv4 or "" for p in state.pods.values()]
    for _ in range(25):
        src = data.draw(st.sampled_from(addresses))
        dst = data.draw(st.sampled_from(pod_ips if src not in pod_ips else addresses + EXTERNAL[3:]))
        packet = data.draw(st.sampled_from(PACKETS))
        got = tracing.trace(intents, src, dst, packet[1], packet[0])
        expected = reference(accepted, state, src, dst, packet)
        assert got.allowed is expected, f"{src} -> {dst} {packet}\n{got.describe()}\n{accepted}"


def agree_everywhere(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]], bodies: list[dict[str, Any]]
) -> None:
    """``test_trace_agrees_with_reference`` for every source, destination and packet of one example."""
    state, accepted = build_state(cluster, bodies)
    assert len(accepted) == len(bodies)
    intents = resolve_cluster(state)
    pod_ips = [p.ipv4 or "" for p in state.pods.values()]
    for src in pod_ips + EXTERNAL[:3] + list(NODE_IPS.values())[:2]:
        for dst in pod_ips if src not in pod_ips else pod_ips + EXTERNAL + list(NODE_IPS.values()):
            for packet in PACKETS:
                got = tracing.trace(intents, src, dst, packet[1], packet[0])
                expected = reference(accepted, state, src, dst, packet)
                assert got.allowed is expected, f"{src} -> {dst} {packet}\n{got.describe()}"


def counterexample_cluster() -> tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]]:
    """A random run's counterexample: a pod declaring ``http``, one declaring ``pg``/``dns``, one declaring none."""
    namespaces = {n: NamespaceInfo(n, {"team": "red"}) for n in NAMESPACES}
    nodes = {n: NodeInfo(n, ip) for n, ip in NODE_IPS.items()}
    ports = {app: tuple(ContainerPort(n, p, pr) for n, p, pr in APP_PORTS[app]) for app in APP_PORTS}
    pods = {
        "u0": PodInfo("a", "p0", "u0", "n1", "10.0.1.1", {}),
        "u1": PodInfo("b", "p1", "u1", "n3", "10.0.3.2", {"app": "db"}, "", ports["db"]),
        "u6": PodInfo("c", "p6", "u6", "n2", "10.0.2.7", {"app": "web"}, "", ports["web"]),
    }
    return namespaces, nodes, pods


@pytest.mark.parametrize("egress", [
    [{"toEndpoints": [{}], "toEntities": ["all"], "toPorts": [{"ports": [{"port": "http"}, {"port": "80"}]}]}],
    [{"toEntities": ["all"], "toPorts": [{"ports": [{"port": "dns", "protocol": "UDP"}, {"port": "pg"}]}]}],
    [{"toPorts": [{"ports": [{"port": "pg"}, {"port": "http", "protocol": "TCP"}]}]}],
    [{"toEntities": ["cluster"], "toPorts": [{"ports": [{"port": "dns"}]}]},
     {"toCIDRSet": [{"cidr": "0.0.0.0/0"}], "toPorts": [{"ports": [{"port": "dns"}]}]}],
], ids=["all-and-endpoints", "all", "l4-only", "cluster-and-cidr"])
def test_any_peer_named_port_counterexample(egress: list[dict[str, Any]]) -> None:
    """A named port allowed to any peer resolves against each destination's own ports, not every pod's."""
    cluster = counterexample_cluster()
    body = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "pol3", "uid": "uid3", "namespace": "c"},
            "spec": {"endpointSelector": {}, "egress": egress}}
    deny = {**body, "metadata": {"name": "deny", "uid": "uid4", "namespace": "c"},
            "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["all"]}], "egressDeny": egress}}
    agree_everywhere(cluster, [body])
    agree_everywhere(cluster, [deny])
    state, _ = build_state(cluster, [body])
    # p0 declares no port at all: nothing named reaches it, whatever p6 itself or p1 declare
    for packet in [("TCP", 8080), ("UDP", 53), ("TCP", 5432)]:
        assert not tracing.trace(state, "10.0.2.7", "10.0.1.1", packet[1], packet[0]).allowed


@SETTINGS
@given(cluster=clusters(), bodies=policies())
def test_resolution_is_deterministic(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]], bodies: list[dict[str, Any]]
) -> None:
    state, _ = build_state(cluster, bodies)
    first = resolve_cluster(state)
    shuffled = replace(state, pods=dict(reversed(list(state.pods.items()))))
    second = resolve_cluster(shuffled)
    assert {n: i.content_hash() for n, i in first.items()} == {n: i.content_hash() for n, i in second.items()}


def normalised(intent: NodeIntent) -> Any:
    """The intent with identity numbers replaced by their labels (local CIDR numbers depend on history)."""
    def ident(number: int) -> Any:
        return intent.identity_labels.get(number, number)

    def direction(policy: Any) -> Any:
        return policy.enforced, sorted(
            (repr(ident(e.identity)), int(e.protocol), e.port_low, e.port_high, e.icmp_type or -1, e.verdict.value,
             e.l7_redirect, tuple((r.uid, r.rule_index, r.section) for r in e.rules))
            for e in policy.entries
        )

    return (
        [(e.uid, e.ipv4, ident(e.identity), direction(e.ingress), direction(e.egress)) for e in intent.endpoints],
        sorted((e.cidr, ident(e.identity)) for e in intent.ipcache),
        sorted(intent.identity_labels.values()),
        [(p.uid, p.generation) for p in intent.policies],
    )


@SETTINGS
@given(cluster=clusters(), bodies=policies(), data=st.data())
def test_incremental_updates_equal_full_resolution(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]],
    bodies: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    allocator = InMemoryIdentityAllocator()
    resolver = Resolver(allocator)
    state, _ = build_state(cluster, bodies)
    previous = resolver.update(state)
    namespaces, nodes, pods = cluster
    for _ in range(3):
        change = data.draw(st.sampled_from(["relabel", "policy", "remove", "namespace"]))
        if change == "relabel":
            uid = data.draw(st.sampled_from(sorted(pods)))
            labels = {k: data.draw(st.sampled_from(v)) for k, v in label_values.items() if data.draw(st.booleans())}
            pods = {**pods, uid: replace(pods[uid], labels=labels)}
        elif change == "remove" and len(pods) > 1:
            uid = data.draw(st.sampled_from(sorted(pods)))
            pods = {k: v for k, v in pods.items() if k != uid}
        elif change == "namespace":
            ns = data.draw(st.sampled_from(NAMESPACES))
            namespaces = {**namespaces, ns: NamespaceInfo(ns, {"team": data.draw(st.sampled_from(["red", "blue"]))})}
        else:
            bodies = data.draw(policies())
        state, _ = build_state((namespaces, nodes, pods), bodies)
        result = resolver.update(state)
        full = resolve_cluster(state, allocator)
        assert {n: normalised(i) for n, i in result.intents.items()} == {n: normalised(i) for n, i in full.items()}
        for name, intent in result.intents.items():
            if name not in result.changed:
                assert intent.content_hash() == previous.intents[name].content_hash()
        previous = result


@SETTINGS
@given(cluster=clusters(), data=st.data())
def test_policy_edit_on_one_node_leaves_other_nodes_alone(
    cluster: tuple[dict[str, NamespaceInfo], dict[str, NodeInfo], dict[str, PodInfo]], data: st.DataObject
) -> None:
    pinned = {"matchLabels": {"pin": "yes"}}

    def body(rule: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                "metadata": {"name": "pinned", "uid": "pinned"}, "spec": rule}

    others = data.draw(policies())
    before_rule = data.draw(rules(subject=pinned, cidrs=False))
    after_rule = data.draw(rules(subject=pinned, cidrs=False))
    resolver = Resolver()
    first = resolver.update(build_state(cluster, [*others, body(before_rule)])[0])
    second = resolver.update(build_state(cluster, [*others, body(after_rule)])[0])
    for name in ("n2", "n3"):
        assert second.intents[name].content_hash() == first.intents[name].content_hash()
        assert name not in second.changed
