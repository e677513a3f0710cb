"""What of a Kubernetes NetworkPolicy Ciliary does not enforce exactly as written.

Owns :data:`NETPOL_FEATURES` (the NetworkPolicy rows of the enforcement table,
README "NetworkPolicy") and :func:`netpol_gaps`, which the operator shell calls
for every valid NetworkPolicy; its result travels the same way as a CNP's
``policy.support`` gaps: the policy never reads enforced, and a Warning Event
``PolicyPartiallyEnforced`` names each part. Nothing here widens a policy: every
gap is a place where Ciliary allows *less* than the policy says (an IPv6 block
selects nothing, IPv6 is dropped on an enforced direction, a pod inside an
``ipBlock`` is matched by its labels only).

Pure: reads only the API model and the pod CIDRs it is given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from ciliary.operator.api.networkpolicy import NetworkPolicy, NetworkPolicyPeer
from ciliary.operator.policy.netpol_compiling import unrepresentable_keys
from ciliary.operator.policy.support import Feature, Gap, Support

_E, _P = Support.ENFORCED, Support.PARTIAL

NETPOL_FEATURES: tuple[Feature, ...] = (
    Feature("np-podSelector", "`spec.podSelector`, `policyTypes` (also defaulted), empty `ingress`/`egress`", _E,
            "selects pods of the policy's namespace; a listed direction is default-deny, an empty list denies "
            "all of it"),
    Feature("np-peers", "peers `podSelector`, `namespaceSelector`, both (AND); empty `from`/`to`", _E,
            "pods by labels, in the policy's namespace or the selected namespaces; empty means every peer "
            "(for IPv6 see the last row)"),
    Feature("np-ports", "`ports`: number, `endPort`, named port, protocol TCP/UDP/SCTP; empty means all", _E,
            "L4 ports and ranges; a named port resolves against the pod that owns it"),
    Feature("np-ipBlock", "`ipBlock` (IPv4) with `except`", _E,
            "addresses outside the cluster, minus the excepted prefixes"),
    Feature("np-ipBlock-ipv6", "`ipBlock` with an IPv6 CIDR", _P,
            "not enforced (IPv4-only datapath): it selects no peer"),
    Feature("np-ipBlock-pods", "`ipBlock` covering pod addresses", _P,
            "pods are matched by their labels only (as in Cilium): a pod whose address is in the block is not "
            "allowed by it"),
    Feature("np-unrepresentable-label", "a pod selector on a per-pod or Kubernetes-set label key "
            "(`statefulset.kubernetes.io/pod-name`, `pod-template-hash`, `kubernetes.io/*`, …)", _P,
            "not enforced: security identities do not carry such labels, so the selector matches no pod (as "
            "`spec.podSelector` the policy then restricts no pod; as a peer it allows nothing)"),
    Feature("np-all-peers", "a rule with empty `from`/`to`", _P,
            "its IPv4 part is enforced; IPv6 to or from the selected pods is dropped (IPv4-only datapath), "
            "although the rule allows it"),
)
BY_KEY = {f.key: f for f in NETPOL_FEATURES}


def _gap(path: str, key: str) -> Gap:
    return Gap(path, BY_KEY[key])


def _peer_gaps(peer: NetworkPolicyPeer, path: str, pod_cidrs: Iterable[ipaddress.IPv4Network]) -> Iterator[Gap]:
    if unrepresentable_keys(peer.pod_selector):
        yield _gap(f"{path}.podSelector", "np-unrepresentable-label")
    if peer.ip_block is None:
        return
    try:
        block = ipaddress.ip_network(peer.ip_block.cidr, strict=False)
    except ValueError:
        return
    if block.version == 6:
        yield _gap(f"{path}.ipBlock", "np-ipBlock-ipv6")
        return
    excepts = [ipaddress.ip_network(e, strict=False) for e in peer.ip_block.except_ or ()]
    for cidr in pod_cidrs:
        if cidr.overlaps(block) and not any(cidr.version == e.version and cidr.subnet_of(e)
                                            for e in excepts):
            yield _gap(f"{path}.ipBlock", "np-ipBlock-pods")
            return


def netpol_gaps(policy: NetworkPolicy, pod_cidrs: Iterable[str] = ()) -> tuple[Gap, ...]:
    """Every part of ``policy`` not enforced exactly as written; ``pod_cidrs``: the nodes' pod CIDRs."""
    cidrs = []
    for text in pod_cidrs:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network):
            cidrs.append(net)
    found: list[Gap] = []
    if unrepresentable_keys(policy.spec.pod_selector):
        found.append(_gap("spec.podSelector", "np-unrepresentable-label"))
    types = policy.spec.effective_policy_types()
    sections = []
    if "Ingress" in types:
        sections += [(f"spec.ingress[{i}]", "from", r.from_) for i, r in enumerate(policy.spec.ingress or ())]
    if "Egress" in types:
        sections += [(f"spec.egress[{i}]", "to", r.to) for i, r in enumerate(policy.spec.egress or ())]
    for path, field, peers in sections:
        if not peers:
            found.append(_gap(f"{path}.{field}", "np-all-peers"))
        for j, peer in enumerate(peers or ()):
            found.extend(_peer_gaps(peer, f"{path}.{field}[{j}]", cidrs))
    return tuple(found)


def render_table() -> str:
    """The NetworkPolicy rows as Markdown (README.md holds exactly this)."""
    lines = ["| construct | enforcement | what Ciliary does |", "| --- | --- | --- |"]
    lines += [f"| {f.construct} | {f.support.value} | {f.what} |" for f in NETPOL_FEATURES]
    return "\n".join(lines)
