"""Kubernetes NetworkPolicy to the normalised rules resolution reads (the same ``CompiledRule`` as a CNP).

Owns :func:`compile_network_policy`, called by ``repository`` for every valid
NetworkPolicy, and the selector translation :func:`peer_selector`. A
NetworkPolicy becomes one :class:`~ciliary.operator.policy.compiling.CompiledRule`
(rule index 0; items ``ingress[i]`` / ``egress[i]``), so identities, entries,
the datapath, status and ``policy trace`` are shared with CNP/CCNP and allows add
up across all three kinds. Decisions (documented for users):

- the subject is ``podSelector`` in the policy's namespace; a direction listed in
  the (defaulted) ``policyTypes`` is enforced and default-deny, whatever its rule
  list holds (``ingress: []`` or no ``ingress`` denies all of it); rules of a
  direction not listed are ignored, as the API documents;
- every label of a NetworkPolicy selector is a Kubernetes label (source ``k8s``); a pod
  selector requirement on a key identities do not carry (``identities.is_relevant_pod_label``:
  per-pod or Kubernetes-set keys such as ``statefulset.kubernetes.io/pod-name``) makes the
  selector match no pod, whatever its operator (never "every pod" for ``NotIn``/``DoesNotExist``);
  ``netpol_support`` reports it;
- a peer with ``podSelector`` only selects pods of the policy's namespace; with
  ``namespaceSelector`` only, every pod of the namespaces it selects (namespace
  labels are ``io.cilium.k8s.namespace.labels.*`` on the pod's identity); with
  both, pods matching both (AND); none of these ever selects a non-pod peer;
- ``ipBlock`` is a CIDR with ``except``: it selects addresses that carry no pod or
  node identity (outside the cluster), as Cilium does; a pod's address inside the
  block is matched by the pod's labels only (see ``netpol_support``); an IPv6
  block is not enforced and selects nothing;
- ``from``/``to`` empty or unset selects every peer (identity 0); ``ports`` empty
  or unset covers every port and protocol (ICMP included); a port without
  ``port`` covers every port of its protocol; ``endPort`` gives a range; a named
  port resolves against the pod that owns it (ingress: the subject's containers;
  egress: each destination pod's).
"""

from __future__ import annotations

from collections.abc import Sequence

from ciliary.operator.api.networkpolicy import NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort
from ciliary.operator.api.selectors import LabelSelector
from ciliary.operator.intents import Direction, Protocol, RuleRef, Verdict
from ciliary.operator.policy import identities, selection
from ciliary.operator.policy.compiling import (
    CidrMatch,
    CompiledRule,
    PeerRule,
    PortMatch,
    parse_prefix,
    policy_ref,
)
from ciliary.operator.policy.selection import K8S_SOURCE, NAMESPACE_LABELS_PREFIX, Requirement, Selector

_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}


MATCHES_NO_POD = Requirement(K8S_SOURCE, selection.NAMESPACE_KEY, "In", ())
"""A requirement no identity satisfies."""


def unrepresentable_keys(selector: LabelSelector | None) -> list[str]:
    """Keys of a pod selector that pod identities do not carry."""
    if selector is None:
        return []
    keys = [*(selector.match_labels or {}), *(e.key for e in selector.match_expressions or ())]
    return [k for k in keys if not identities.is_relevant_pod_label(k)]


def k8s_requirements(selector: LabelSelector | None, key_prefix: str = "") -> list[Requirement]:
    """A Kubernetes label selector as requirements on ``k8s`` labels (keys prefixed with ``key_prefix``)."""
    if selector is None:
        return []
    if not key_prefix and unrepresentable_keys(selector):
        return [MATCHES_NO_POD]
    out = [Requirement(K8S_SOURCE, key_prefix + key, "In", (value,))
           for key, value in (selector.match_labels or {}).items()]
    for expression in selector.match_expressions or ():
        values = tuple(sorted(set(expression.values or ())))
        out.append(Requirement(K8S_SOURCE, key_prefix + expression.key, expression.operator, values))
    return out


def subject_selector(policy: NetworkPolicy) -> Selector:
    return Selector.of([*k8s_requirements(policy.spec.pod_selector), selection.namespace_is(policy.namespace)])


def peer_selector(peer: NetworkPolicyPeer, namespace: str) -> Selector | None:
    """The pods a peer selects, or None for an ``ipBlock`` peer."""
    if peer.namespace_selector is None and peer.pod_selector is None:
        return None
    pods = k8s_requirements(peer.pod_selector)
    if peer.namespace_selector is None:
        return Selector.of([*pods, selection.namespace_is(namespace)])
    namespaces = k8s_requirements(peer.namespace_selector, NAMESPACE_LABELS_PREFIX)
    return Selector.of([*pods, *namespaces, selection.NAMESPACE_EXISTS])


def _cidr(peer: NetworkPolicyPeer) -> CidrMatch | None:
    if peer.ip_block is None:
        return None
    prefix = parse_prefix(peer.ip_block.cidr)
    if prefix is None:
        return None  # IPv6: not enforced, selects nothing
    excepts = {e for e in (parse_prefix(t) for t in peer.ip_block.except_ or ()) if e is not None}
    return CidrMatch(prefix, tuple(sorted(e for e in excepts if e.subnet_of(prefix))))


def _ports(ports: Sequence[NetworkPolicyPort]) -> tuple[PortMatch, ...]:
    out: list[PortMatch] = []
    for port in ports:
        protocol = _PROTOCOLS[port.effective_protocol]
        if isinstance(port.port, str):
            out.append(PortMatch(protocol, name=port.port))
        elif port.port is None:
            out.append(PortMatch(protocol))
        else:
            out.append(PortMatch(protocol, port.port, max(port.port, port.end_port or 0)))
    return tuple(out)


def _item(ref: RuleRef, direction: Direction, namespace: str, peers: Sequence[NetworkPolicyPeer] | None,
          ports: Sequence[NetworkPolicyPort] | None) -> PeerRule:
    selectors: list[Selector] = []
    cidrs: list[CidrMatch] = []
    for peer in peers or ():
        chosen = peer_selector(peer, namespace)
        if chosen is not None:
            selectors.append(chosen)
        elif (match := _cidr(peer)) is not None:
            cidrs.append(match)
    return PeerRule(
        ref=ref, direction=direction, verdict=Verdict.ALLOW,
        selectors=tuple(dict.fromkeys(selectors)), cidrs=tuple(dict.fromkeys(cidrs)),
        any_peer=not peers, ports=_ports(ports or ()), l4_written=bool(ports),
    )


def compile_network_policy(policy: NetworkPolicy) -> tuple[CompiledRule, ...]:
    """The policy as one normalised rule (a validated policy never fails here)."""
    ref = policy_ref(policy)
    namespace = policy.namespace
    types = policy.spec.effective_policy_types()

    def rule_ref(section: str, index: int) -> RuleRef:
        return RuleRef(kind="NetworkPolicy", namespace=namespace, name=policy.name, uid=ref.uid, rule_index=0,
                       section=f"{section}[{index}]")

    has_ingress, has_egress = "Ingress" in types, "Egress" in types
    ingress = tuple(_item(rule_ref("ingress", i), Direction.INGRESS, namespace, r.from_, r.ports)
                    for i, r in enumerate(policy.spec.ingress or ())) if has_ingress else ()
    egress = tuple(_item(rule_ref("egress", i), Direction.EGRESS, namespace, r.to, r.ports)
                   for i, r in enumerate(policy.spec.egress or ())) if has_egress else ()
    return (CompiledRule(policy=ref, rule_index=0, subject=subject_selector(policy), ingress=ingress, egress=egress,
                         has_ingress=has_ingress, has_egress=has_egress, default_deny_ingress=has_ingress,
                         default_deny_egress=has_egress),)
