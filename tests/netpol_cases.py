"""The x/y/z x a/b/c pod model and hypothesis strategies for NetworkPolicy sets (shared by tests).

Namespaces x, y, z (labels ``ns=<name>``, ``kubernetes.io/metadata.name=<name>``), pods a, b, c
(label ``pod=<name>``) in each, every pod serving 80/81 on TCP and UDP (named
``serve-<port>-<proto>``) and 82 on SCTP; the strategies draw policies the API server accepts, with
or without ``policyTypes`` (:func:`defaulted` adds it as the API server stores it).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from ciliary.operator.api.networkpolicy import parse_network_policy
from ciliary.operator.api.policies import parse_policy
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState
from netpol_oracle import Cluster, Pod

NAMESPACES = ("x", "y", "z")
PODNAMES = ("a", "b", "c")
NS_LABELS = {ns: {"ns": ns, "kubernetes.io/metadata.name": ns} for ns in NAMESPACES}
PORTS = (("serve-80-tcp", 80, "TCP"), ("serve-81-tcp", 81, "TCP"), ("serve-80-udp", 80, "UDP"),
         ("serve-81-udp", 81, "UDP"), ("serve-82-sctp", 82, "SCTP"))
WORLD = "203.0.113.7"


def _pod_ip(i: int, j: int) -> str:
    return f"10.0.{1 + (i + j) % 2}.{10 + 3 * i + j}"


ORACLE_PODS = tuple(
    Pod(ns, name, _pod_ip(i, j), {"pod": name}, ports=PORTS)
    for i, ns in enumerate(NAMESPACES) for j, name in enumerate(PODNAMES)
)
ORACLE = Cluster(ORACLE_PODS, NS_LABELS)


def netpol(spec: dict[str, Any], *, name: str = "np", ns: str = "x") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-np-{ns}-{name}", "generation": 1},
            "spec": spec}


LABEL_SELECTORS = st.sampled_from([
    {}, {"matchLabels": {"pod": "a"}}, {"matchLabels": {"pod": "b"}},
    {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "c"]}]},
    {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["b"]}]},
    {"matchExpressions": [{"key": "pod", "operator": "Exists"}]},
    {"matchExpressions": [{"key": "other", "operator": "DoesNotExist"}]},
])
NS_SELECTORS = st.sampled_from([
    {}, {"matchLabels": {"ns": "y"}}, {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
    {"matchLabels": {"kubernetes.io/metadata.name": "z"}},
])
IP_BLOCKS = st.sampled_from([
    {"cidr": "203.0.113.0/24"}, {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/29"]},
    {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}, {"cidr": "10.0.1.0/24"}, {"cidr": "2001:db8::/64"},
])
PEERS = st.one_of(
    st.builds(lambda s: {"podSelector": s}, LABEL_SELECTORS),
    st.builds(lambda s: {"namespaceSelector": s}, NS_SELECTORS),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, LABEL_SELECTORS, NS_SELECTORS),
    st.builds(lambda b: {"ipBlock": b}, IP_BLOCKS),
)
PORT_ITEMS = st.sampled_from([
    {"port": 80}, {"port": 81, "protocol": "UDP"}, {"protocol": "UDP"}, {"port": 80, "endPort": 81},
    {"port": "serve-81-tcp"}, {"port": "serve-80-udp", "protocol": "UDP"}, {"port": "serve-80-udp"},
    {"protocol": "SCTP"},
])
RULE_LISTS = st.one_of(st.none(), st.lists(st.fixed_dictionaries({}, optional={
    "peers": st.lists(PEERS, max_size=2), "ports": st.lists(PORT_ITEMS, max_size=2)}), max_size=2))


@st.composite
def netpols(draw: st.DrawFn, index: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": draw(LABEL_SELECTORS)}
    for section, peer_key in (("ingress", "from"), ("egress", "to")):
        rules = draw(RULE_LISTS)
        if rules is not None:
            spec[section] = [{**({peer_key: r["peers"]} if "peers" in r else {}),
                              **({"ports": r["ports"]} if "ports" in r else {})} for r in rules]
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types is not None:
        spec["policyTypes"] = types
    return netpol(spec, name=f"p{index}", ns=draw(st.sampled_from(NAMESPACES)))


POLICY_SETS = st.integers(min_value=0, max_value=4).flatmap(
    lambda n: st.tuples(*(netpols(i) for i in range(n))))


def defaulted(policy: dict[str, Any]) -> dict[str, Any]:
    """``policy`` as the API server stores it: ``policyTypes`` filled in when unset."""
    out = copy.deepcopy(policy)
    spec = out["spec"]
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]
    return out


def ip_of(name: str) -> str:
    """``ns/pod`` -> the pod's address; anything else is returned as it is."""
    if "/" not in name:
        return name
    ns, pod = name.split("/")
    return next(p.ip for p in ORACLE_PODS if p.namespace == ns and p.name == pod)


NODES = {"n1": NodeInfo("n1", "192.168.0.1", "10.0.1.0/24"), "n2": NodeInfo("n2", "192.168.0.2", "10.0.2.0/24")}
NS_INFO = {ns: NamespaceInfo(ns, labels) for ns, labels in NS_LABELS.items()}


PODS = {
    f"u-{p.namespace}-{p.name}": PodInfo(
        p.namespace, p.name, f"u-{p.namespace}-{p.name}", f"n{1 + int(p.ip.split('.')[2]) - 1}", p.ip,
        dict(p.labels), container_ports=tuple(ContainerPort(n, num, pr) for n, num, pr in p.ports))
    for p in ORACLE_PODS
}


def state_of(*bodies: dict[str, Any]) -> ClusterState:
    repo = PolicyRepository()
    for body in bodies:
        repo.upsert(parse_network_policy(body) if body["kind"] == "NetworkPolicy" else parse_policy(body))
    return ClusterState(repo.snapshot(), PODS, NS_INFO, NODES)
