"""The Python model of the datapath's per-packet policy decision (pure).

:func:`simulate_lookup` answers, for one forward packet, what ``cy_enforce``
(``datapath_c/lib/enforce.h``) and ``cy_policy_verdict`` (``lib/policy.h``)
decide from the map contents ``planning`` writes: the endpoint's flags, then
up to four LPM probes of the deny map (only when its deny flag is set), then
up to four of the allow map (whose hit drops when it needs a proxy the node does
not run, ``POLICY_NO_PROXY``). The unit tests check it against
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
           identity: int, protocol: int, port: int) -> PolicyValue | None:
    identities = (identity, 0) if identity != 0 else (0,)
    protocols = (protocol, 0) if protocol != 0 else (0,)
    for ident in identities:
        for proto in protocols:
            hit = _lpm_hit(table, ep_id, direction, ident, proto, port)
            if hit is not None:
                return hit
    return None


def simulate_lookup(allow: Table, deny: Table, *, flags: int, ep_id: int, direction: MapDirection, identity: int,
                    protocol: int, port: int) -> LookupResult:
    """What ``cy_enforce``/``cy_policy_verdict`` (lib/enforce.h, lib/policy.h) decide for a
    forward packet of an endpoint whose ``endpoint_info.flags`` are ``flags``."""
    if not flags & planning.enforced_flag(direction):
        return LookupResult(True, "not-enforced")
    if flags & planning.deny_flag(direction):
        hit = _probe(deny, ep_id, direction, identity, protocol, port)
        if hit is not None:
            return LookupResult(False, "denied-by-rule", hit.cookie)
    hit = _probe(allow, ep_id, direction, identity, protocol, port)
    if hit is not None and hit.flags & planning.POLICY_NO_PROXY:
        return LookupResult(False, "proxy-unavailable", hit.cookie)
    if hit is not None:
        return LookupResult(True, "allowed", hit.cookie)
    return LookupResult(False, "default-deny")
