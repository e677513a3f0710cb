"""The Python model of the datapath's per-packet policy decision (pure).

:func:`simulate_lookup` answers, for one forward packet, what ``cy_enforce``
(``datapath_c/lib/enforce.h``) and ``cy_policy_verdict`` (``lib/policy.h``)
decide from the map contents ``planning`` writes: the endpoint's flags, then
up to four LPM probes of the deny map (only when its deny flag is set), then
up to four of the allow map (whose hit drops when it needs a proxy the node does
not run, ``POLICY_NO_PROXY``), and the match type the datapath records for the
hit (``CY_MATCH_*``, Hubble's numbers). The unit tests check it against
``ciliary.operator.intents.evaluate_entries``, and check that every
intermediate state of ``planning.write_order`` stays within the old and the
new policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from ciliary.nodeagent import planning
from ciliary.nodeagent.planning import PORT_BITS, MapDirection, PolicyKey, PolicyValue

Table = Mapping[PolicyKey, PolicyValue]


@dataclasses.dataclass(frozen=True)
class LookupResult:
    allowed: bool
    reason: Literal["allowed", "denied-by-rule", "default-deny", "not-enforced", "proxy-unavailable"]
    cookie: int = 0
    match_type: int = 0
    """``CY_MATCH_*`` of the deciding entry (``hubble_convert.MATCH_TYPES``); 0 when none decided."""


MATCH_L3_ONLY, MATCH_L3_L4, MATCH_L4_ONLY, MATCH_ALL, MATCH_L3_PROTO, MATCH_PROTO_ONLY = 1, 2, 3, 4, 5, 6


def match_type(by_identity: bool, key_protocol: int, hit: PolicyValue) -> int:
    """``cy_match_type`` (lib/policy.h): the kind of a hit found under a key naming the peer's identity or not,
    with protocol ``key_protocol`` (0: any), whose value says whether its port block was "any port"."""
    if not hit.flags & planning.POLICY_ANY_PORT:
        return MATCH_L3_L4 if by_identity else MATCH_L4_ONLY
    if key_protocol:
        return MATCH_L3_PROTO if by_identity else MATCH_PROTO_ONLY
    return MATCH_L3_ONLY if by_identity else MATCH_ALL


def _lpm_hit(table: Table, ep_id: int, direction: MapDirection,
             identity: int, protocol: int, port: int) -> PolicyValue | None:
    """One LPM lookup of the full-length key, as the kernel's trie answers it."""
    for bits in range(PORT_BITS, -1, -1):
        start = port & ~((1 << (PORT_BITS - bits)) - 1) & 0xFFFF
        value = table.get(PolicyKey(ep_id, direction, identity, protocol, start, bits))
        if value is not None:
            return value
    return None


def _probe(table: Table, ep_id: int, direction: MapDirection,
           identity: int, protocol: int, port: int) -> tuple[PolicyValue | None, int]:
    """The first hit of the four probes, most specific first, and its match type."""
    identities = (identity, 0) if identity != 0 else (0,)
    protocols = (protocol, 0) if protocol != 0 else (0,)
    for ident in identities:
        for proto in protocols:
            hit = _lpm_hit(table, ep_id, direction, ident, proto, port)
            if hit is not None:
                return hit, match_type(ident != 0, proto, hit)
    return None, 0


def simulate_lookup(allow: Table, deny: Table, *, flags: int, ep_id: int, direction: MapDirection, identity: int,
                    protocol: int, port: int) -> LookupResult:
    """What ``cy_enforce``/``cy_policy_verdict`` (lib/enforce.h, lib/policy.h) decide for a
    forward packet of an endpoint whose ``endpoint_info.flags`` are ``flags``."""
    if not flags & planning.enforced_flag(direction):
        return LookupResult(True, "not-enforced")
    if flags & planning.deny_flag(direction):
        hit, kind = _probe(deny, ep_id, direction, identity, protocol, port)
        if hit is not None:
            return LookupResult(False, "denied-by-rule", hit.cookie, kind)
    hit, kind = _probe(allow, ep_id, direction, identity, protocol, port)
    if hit is not None and hit.flags & planning.POLICY_NO_PROXY:
        return LookupResult(False, "proxy-unavailable", hit.cookie, kind)
    if hit is not None:
        return LookupResult(True, "allowed", hit.cookie, kind)
    return LookupResult(False, "default-deny")
