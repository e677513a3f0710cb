"""LB IPAM: which LoadBalancer IP each Service gets from the CiliumLoadBalancerIPPools (pure).

:func:`allocate` takes the valid pools and the Services (:class:`ServiceClaim`, what a Service's body
says about its IPs) and returns every eligible Service's IPs with the condition that explains them
(``io.cilium/lb-ipam-request-satisfied``) and every pool's counts and conflict. The rules, in Cilium's
terms (docs.cilium.io, "LoadBalancer IP Address Management"):

- eligible: ``spec.type: LoadBalancer`` without ``spec.loadBalancerClass``; the rest is left alone;
- a pool serves a Service when its ``serviceSelector`` matches the Service's labels (plus
  ``io.kubernetes.service.namespace`` and ``io.kubernetes.service.name``); no selector: every Service;
- pools whose blocks overlap an older pool's (creation time, then name) are conflicting: nothing is
  allocated from them; a disabled pool allocates nothing new, what it gave stays;
- a Service keeps the IPs it holds while a pool still serves it (older Services first), so a restart
  or an unrelated change never moves an address; requested IPs (``lbipam.cilium.io/ips``, comma
  separated, or the deprecated ``spec.loadBalancerIP``) are given all or none; otherwise the lowest
  free address of the first pool that serves the Service.

Ciliary balances IPv4 only, so a Service that needs an IPv6 address (IPv6-only, ``RequireDualStack``), a
requested IPv6 address and sharing keys (``lbipam.cilium.io/sharing-key``) are refused with a condition
saying so; a pool's counts are of its IPv4 addresses. A Service that stops being eligible (another type,
a class) loses what LB IPAM gave it (``lb_ipam_patches.release_patch``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ciliary.operator.api.lb_ippool import LBIPPool
from ciliary.operator.api.selectors import LabelSelector

CONDITION = "io.cilium/lb-ipam-request-satisfied"
IPS_ANNOTATION = "lbipam.cilium.io/ips"
SHARING_ANNOTATION = "lbipam.cilium.io/sharing-key"
NAMESPACE_KEY = "io.kubernetes.service.namespace"
NAME_KEY = "io.kubernetes.service.name"


@dataclass(frozen=True)
class ServiceClaim:
    """What one Service's body says about its LoadBalancer IPs."""

    namespace: str
    name: str
    created: str = ""
    type: str = "LoadBalancer"
    load_balancer_class: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ip_families: tuple[str, ...] = ("IPv4",)
    ip_family_policy: str = "SingleStack"
    load_balancer_ip: str = ""
    holds: tuple[str, ...] = ()
    """The IPs in its ``status.loadBalancer.ingress`` now."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def eligible(self) -> bool:
        return self.type == "LoadBalancer" and not self.load_balancer_class


@dataclass(frozen=True)
class Outcome:
    """A Service's IPs and the condition explaining them (``satisfied`` is the only True reason)."""

    ips: tuple[str, ...]
    satisfied: bool
    reason: str
    message: str = ""


@dataclass(frozen=True)
class PoolReport:
    total: int
    used: int
    conflict: str = ""
    """Why the pool is conflicting; "" when it is not."""

    @property
    def available(self) -> int:
        return self.total - self.used


@dataclass(frozen=True)
class Allocation:
    services: Mapping[str, Outcome]
    pools: Mapping[str, PoolReport]


@dataclass(frozen=True)
class _Range:
    first: int
    last: int
    version: int
    text: str


def _ranges(pool: LBIPPool) -> list[_Range]:
    allow = pool.spec.allow_first_last_i_ps != "No"
    out = []
    for block in pool.spec.blocks:
        first, last = block.bounds(allow)
        text = block.cidr or (f"{block.start}-{block.stop}" if block.stop else str(block.start))
        out.append(_Range(int(first), int(last), first.version, text))
    return out


def selects(selector: LabelSelector | None, claim: ServiceClaim) -> bool:
    """Whether a pool's ``serviceSelector`` matches the Service (labels plus its namespace and name)."""
    if selector is None:
        return True
    labels = {**claim.labels, NAMESPACE_KEY: claim.namespace, NAME_KEY: claim.name}
    if any(labels.get(k) != v for k, v in (selector.match_labels or {}).items()):
        return False
    for req in selector.match_expressions or ():
        present, values = req.key in labels, req.values or ()
        if req.operator == "In" and not (present and labels[req.key] in values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def _requested(claim: ServiceClaim) -> list[str]:
    raw = claim.annotations.get(IPS_ANNOTATION, "")
    parts = list(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))  # each once, in order
    return parts or ([claim.load_balancer_ip] if claim.load_balancer_ip else [])


class _Pools:
    """The usable pools in order, with their ranges, and which address each Service holds."""

    def __init__(self, pools: Sequence[LBIPPool]) -> None:
        self.order: list[tuple[LBIPPool, list[_Range]]] = []
        self.conflicts: dict[str, str] = {}
        self.ranges = {pool.name: _ranges(pool) for pool in pools}
        """Every pool's ranges, conflicting ones included (their counts)."""
        for pool in sorted(pools, key=lambda p: (p.created, p.name)):
            ranges = self.ranges[pool.name]
            clash = next(((mine, theirs, other.name) for mine in ranges for other, rs in self.order
                          for theirs in rs if mine.version == theirs.version and mine.first <= theirs.last
                          and theirs.first <= mine.last), None)
            if clash:
                self.conflicts[pool.name] = (f"Pool conflicts since block '{clash[0].text}' overlaps block "
                                             f"'{clash[1].text}' from IP Pool '{clash[2]}'")
                continue
            self.order.append((pool, ranges))
        self.used: dict[int, str] = {}

    def serving(self, claim: ServiceClaim, address: int, *, new: bool) -> bool:
        return any(selects(pool.spec.service_selector, claim) and not (new and pool.spec.disabled)
                   and any(r.version == 4 and r.first <= address <= r.last for r in ranges)
                   for pool, ranges in self.order)

    def free(self, claim: ServiceClaim) -> tuple[int | None, bool]:
        """The lowest free IPv4 address for a new allocation, and whether any pool serves the Service."""
        matched = False
        for pool, ranges in self.order:
            if pool.spec.disabled or not selects(pool.spec.service_selector, claim):
                continue
            matched = True
            for r in ranges:
                if r.version != 4:
                    continue
                address = r.first
                while address <= r.last:
                    if address not in self.used:
                        return address, True
                    address += 1
        return None, matched


def allocate(pools: Sequence[LBIPPool], claims: Iterable[ServiceClaim]) -> Allocation:
    state = _Pools(pools)
    ordered = sorted((c for c in claims if c.eligible), key=lambda c: (c.created, c.key))
    kept: dict[str, list[int]] = {}
    for claim in ordered:  # first every Service keeps what it holds and may keep
        wanted = _requested(claim)
        for text in claim.holds:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if (address.version == 4 and int(address) not in state.used and SHARING_ANNOTATION not in claim.annotations
                    and (not wanted or text in wanted) and state.serving(claim, int(address), new=False)):
                state.used[int(address)] = claim.key
                kept.setdefault(claim.key, []).append(int(address))
    outcomes = {claim.key: _decide(claim, state, kept.get(claim.key, [])) for claim in ordered}
    reports = {}
    for pool in pools:
        ranges = state.ranges[pool.name]
        total = sum(r.last - r.first + 1 for r in ranges if r.version == 4)  # IPv6 blocks give nothing here
        used = sum(1 for a in state.used if any(r.version == 4 and r.first <= a <= r.last for r in ranges))
        conflict = state.conflicts.get(pool.name, "")
        reports[pool.name] = PoolReport(total=total, used=0 if conflict else used, conflict=conflict)
    return Allocation(services=outcomes, pools=reports)


def _release(state: _Pools, kept: list[int]) -> None:
    for address in kept:
        state.used.pop(address, None)


def _decide(claim: ServiceClaim, state: _Pools, kept: list[int]) -> Outcome:
    if SHARING_ANNOTATION in claim.annotations:
        _release(state, kept)
        return Outcome((), False, "unsupported",
                       f"{SHARING_ANNOTATION}: sharing an IP between Services is not supported by Ciliary")
    if "IPv4" not in claim.ip_families or claim.ip_family_policy == "RequireDualStack":
        _release(state, kept)
        return Outcome((), False, "unsupported", "Ciliary balances IPv4 only: a Service that needs an IPv6 "
                                                 "address gets none")
    wanted = _requested(claim)
    if wanted:
        return _requested_outcome(claim, state, kept, wanted)
    if kept:
        _release(state, kept[1:])
        return Outcome((str(ipaddress.IPv4Address(kept[0])),), True, "satisfied")
    address, matched = state.free(claim)
    if address is None:
        if matched:
            return Outcome((), False, "out_of_ips", "The CiliumLoadBalancerIPPools that match this service have no "
                                                    "free IPv4 address")
        return Outcome((), False, "no_pool", "There are no enabled CiliumLoadBalancerIPPools that match this service")
    state.used[address] = claim.key
    return Outcome((str(ipaddress.IPv4Address(address)),), True, "satisfied")


def _requested_outcome(claim: ServiceClaim, state: _Pools, kept: list[int], wanted: list[str]) -> Outcome:
    got: list[int] = []
    for text in wanted:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            _release(state, kept)
            return Outcome((), False, "invalid_request", f"requested IP {text!r} is not an IP address")
        if address.version != 4:
            _release(state, kept)
            return Outcome((), False, "unsupported", f"requested IP {text}: Ciliary balances IPv4 only")
        number = int(address)
        if number in kept:
            got.append(number)
            continue
        holder = state.used.get(number)
        if holder is not None:
            _release(state, kept)
            return Outcome((), False, "already_allocated", f"requested IP {text} is already allocated to {holder}")
        if not state.serving(claim, number, new=True):
            _release(state, kept)
            return Outcome((), False, "no_pool", f"requested IP {text} is in no enabled CiliumLoadBalancerIPPool "
                                                 "that matches this service")
        got.append(number)
    for number in got:
        state.used[number] = claim.key
    return Outcome(tuple(str(ipaddress.IPv4Address(n)) for n in got), True, "satisfied")
