"""A cheap first pass of a GetFlows whitelist over the ring's raw events, before any ``flow.Flow`` exists
(pure: no gRPC, no I/O).

``hubble_filter`` judges ``flow.Flow`` messages; reading protobuf fields costs about a microsecond a
flow in Python and converting an event costs far more, which over a 64k ring is the whole budget of a
request. :func:`compile_prefilter` derives from the whitelist a test on the raw event (and the intent
index it arrived under) that is a *necessary* condition: it reads the same event fields
``hubble_convert.to_flow`` copies into the flow, so it never rejects an event whose flow the full
filter would accept. Events it passes are converted and judged by the full filter as before, so what a
client receives is exactly what the full filter selects; the first pass only skips work.

Used per filter (AND of these; OR across the whitelist): verdict, traffic direction, L4 protocol,
source/destination identity, source/destination port, source/destination pod (when every value names
a pod prefix), source/destination service (the event carries a frontend). Other fields are left to the full filter. The blacklist is left to the full filter
too (a NOT cannot be narrowed by a necessary condition). No prefilter (None) when some whitelist
filter sets none of these fields, or the whitelist is empty. A verdict every whitelist filter asks
for (``hubble observe --pod X --verdict DROPPED`` sends two filters with the same verdict) is checked
once, first and inline: most events of a ring fail it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ciliary.hubbleapi import flow_pb2
from ciliary.nodeagent import hubble_filter

RawCheck = Callable[[Any, Any], bool]
"""(event, intent index) -> False only when the event's flow cannot match."""

L4_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMPv4": 1, "ICMPv6": 58}
PORTED = (6, 17, 132)


def flow_verdict(raw: object) -> int:
    """The flow verdict ``to_flow`` gives an event verdict (DROPPED for "dropped" in any case)."""
    return flow_pb2.DROPPED if str(raw).lower() == "dropped" else flow_pb2.FORWARDED


def _verdict_check(verdicts: set[int]) -> RawCheck:
    accepted: dict[object, bool] = {}
    """Raw verdict value -> accepted (events carry a handful of distinct values)."""

    def check(event: Any, _index: Any) -> bool:
        raw = event.verdict
        ok = accepted.get(raw)
        if ok is None:
            ok = accepted[raw] = flow_verdict(raw) in verdicts
        return ok

    return check


def _pod_check(values: Sequence[str], source: bool) -> RawCheck | None:
    """The pod filter on the index's local pods; None (no first pass) when a value has no pod prefix."""
    wanted = []
    for value in values:
        namespace, sep, prefix = value.partition("/")
        if not sep:
            namespace, prefix = "", value
        if not prefix:
            return None  # namespace-only: the namespace may come from identity labels; left to the full filter
        wanted.append((namespace, prefix))

    def check(event: Any, index: Any) -> bool:
        found = index.pods.get(str(event.src if source else event.dst))
        if found is None:
            return False  # no pod name in the flow: a prefix cannot match
        namespace, pod = found
        if not namespace:
            return True  # the flow's namespace comes from labels then: leave it to the full filter
        return any((not ns or ns == namespace) and pod.startswith(prefix) for ns, prefix in wanted)

    return check


def _checks(f: flow_pb2.FlowFilter, *, verdict: bool = True) -> list[RawCheck]:
    checks: list[RawCheck] = []
    if f.verdict and verdict:
        checks.append(_verdict_check(set(f.verdict)))
    if f.traffic_direction:
        directions = set(f.traffic_direction)
        checks.append(lambda e, _i: (flow_pb2.INGRESS if e.direction == "ingress" else flow_pb2.EGRESS) in directions)
    if f.protocol:
        numbers = {L4_NUMBERS[hubble_filter.PROTOCOLS_L4[p.lower()]] for p in f.protocol
                   if p.lower() in hubble_filter.PROTOCOLS_L4}
        checks.append(lambda e, _i: e.protocol in numbers)
    if f.source_identity:
        src_ids = set(f.source_identity)
        checks.append(lambda e, _i: e.src_identity in src_ids)
    if f.destination_identity:
        dst_ids = set(f.destination_identity)
        checks.append(lambda e, _i: e.dst_identity in dst_ids)
    if f.source_port:
        src_ports = {int(p) for p in f.source_port}
        checks.append(lambda e, _i: e.protocol in PORTED and e.sport in src_ports)
    if f.destination_port:
        dst_ports = {int(p) for p in f.destination_port}
        checks.append(lambda e, _i: e.protocol in PORTED and e.dport in dst_ports)
    for values, source in ((f.source_pod, True), (f.destination_pod, False)):
        if values and (pod := _pod_check(values, source)) is not None:
            checks.append(pod)
    if f.source_service or f.destination_service:  # only an event with a frontend names a Service
        checks.append(lambda e, _i: getattr(e, "frontend", None) is not None)
    return checks


def _all(checks: Sequence[RawCheck]) -> RawCheck:
    """AND, cheapest first as written (verdict, then the rest), without a generator per event."""
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda e, i: first(e, i) and second(e, i)
    first, rest = checks[0], _all(checks[1:])
    return lambda e, i: first(e, i) and rest(e, i)


def _gated(verdicts: set[int], rest: RawCheck | None) -> RawCheck:
    """The verdict every filter asks for, checked first and inline (most events fail it), then ``rest``."""
    accepted: dict[object, bool] = {}

    def check(event: Any, index: Any) -> bool:
        raw = event.verdict
        ok = accepted.get(raw)
        if ok is None:
            ok = accepted[raw] = flow_verdict(raw) in verdicts
        return ok and (rest is None or rest(event, index))

    return check


def compile_prefilter(whitelist: Iterable[flow_pb2.FlowFilter]) -> RawCheck | None:
    """The first pass for ``whitelist`` (validated by ``hubble_filter.compile_filters`` first), or None."""
    filters = list(whitelist)
    shared = set(filters[0].verdict) if filters else set()
    if shared and all(set(f.verdict) == shared for f in filters):  # e.g. hubble's --pod X --verdict V
        rests = [_checks(f, verdict=False) for f in filters]
        rest = None if any(not checks for checks in rests) else _any([_all(checks) for checks in rests])
        return _gated(shared, rest)
    per_filter = []
    for f in filters:
        checks = _checks(f)
        if not checks:
            return None  # this filter may pass any event: no first pass can narrow the OR
        per_filter.append(_all(checks))
    if not per_filter:
        return None
    return _any(per_filter)


def _any(per_filter: Sequence[RawCheck]) -> RawCheck:
    """OR of ``per_filter`` without a generator per event."""
    if len(per_filter) == 1:
        return per_filter[0]
    first, rest = per_filter[0], _any(per_filter[1:])
    return lambda e, i: first(e, i) or rest(e, i)
