"""An independent reading of Kubernetes NetworkPolicy semantics, for differential tests.

Written straight from the API documentation (``networking.k8s.io/v1``), over
plain dicts and a small pod model, sharing no code with
``ciliary.operator.policy``: a pod is isolated in a direction once any policy of
its namespace selects it with that policy type; then a connection is allowed
when any rule of any such policy admits the peer and the port. The one
documented divergence from upstream Kubernetes is a parameter:
``ipblock_matches_pods`` (Ciliary and Cilium: False, an ipBlock selects only
addresses outside the cluster; upstream's reading: True). A second parameter,
``name_by_number``, reproduces how the pinned cyclonus probe model names a port
(the first container port with that *number*, whatever its protocol), so a
differential test can tell that artefact from a real disagreement.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ip: str
    labels: Mapping[str, str]
    ports: tuple[tuple[str, int, str], ...] = ()
    """(name, number, protocol) of the pod's container ports."""


@dataclass(frozen=True)
class Cluster:
    pods: tuple[Pod, ...]
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def pod_at(self, ip: str) -> Pod | None:
        return next((p for p in self.pods if p.ip == ip), None)


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def policy_types(spec: Mapping[str, Any]) -> set[str]:
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, cluster: Cluster, ip: str,
                  ipblock_matches_pods: bool) -> bool:
    pod = cluster.pod_at(ip)
    if "ipBlock" in peer:
        if pod is not None and not ipblock_matches_pods:
            return False
        addr = ipaddress.ip_address(ip)
        block = peer["ipBlock"]
        if addr not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(addr in ipaddress.ip_network(e, strict=False) for e in block.get("except") or ())
    if pod is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], cluster.namespaces.get(pod.namespace, {})):
            return False
    elif pod.namespace != policy_ns:
        return False
    return selector_matches(peer.get("podSelector"), pod.labels)


def _port_matches(ports: Sequence[Mapping[str, Any]] | None, port: int, protocol: str,
                  owner: Pod | None, name_by_number: bool = False) -> bool:
    if not ports:
        return True
    for item in ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        want = item.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            if owner is None:
                continue
            if name_by_number:
                first = next((n for n, num, _ in owner.ports if num == port), None)
                if first == want:
                    return True
            elif any(n == want and num == port and pr == protocol for n, num, pr in owner.ports):
                return True
            continue
        if want <= port <= item.get("endPort", want):
            return True
    return False


def _direction_allows(policies: Sequence[Mapping[str, Any]], cluster: Cluster, subject: Pod, peer_ip: str,
                      port: int, protocol: str, direction: str, ipblock_matches_pods: bool,
                      name_by_number: bool) -> bool:
    selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                 and direction in policy_types(p["spec"])
                 and selector_matches(p["spec"].get("podSelector"), subject.labels)]
    if not selecting:
        return True
    section, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    port_owner = subject if direction == "Ingress" else cluster.pod_at(peer_ip)
    for policy in selecting:
        for rule in policy["spec"].get(section) or ():
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, subject.namespace, cluster, peer_ip, ipblock_matches_pods)
                                 for peer in peers):
                continue
            if _port_matches(rule.get("ports"), port, protocol, port_owner, name_by_number):
                return True
    return False


def allowed(policies: Sequence[Mapping[str, Any]], cluster: Cluster, src_ip: str, dst_ip: str, port: int,
            protocol: str, *, ipblock_matches_pods: bool = False, name_by_number: bool = False) -> bool:
    """Would a connection from ``src_ip`` to ``dst_ip`` on ``port``/``protocol`` be allowed?"""
    src, dst = cluster.pod_at(src_ip), cluster.pod_at(dst_ip)
    if src is not None and not _direction_allows(policies, cluster, src, dst_ip, port, protocol, "Egress",
                                                 ipblock_matches_pods, name_by_number):
        return False
    return dst is None or _direction_allows(policies, cluster, dst, src_ip, port, protocol, "Ingress",
                                            ipblock_matches_pods, name_by_number)
