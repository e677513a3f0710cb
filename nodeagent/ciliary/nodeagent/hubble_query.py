"""One ``GetFlows`` request over the flow ring (pure: no gRPC, no I/O).

:func:`plan` validates a ``GetFlowsRequest`` into a :class:`FlowQuery` (raising
``hubble_filter.FilterError`` for anything it cannot honour); :meth:`FlowQuery.history` picks the
kept flows the request asks for, :meth:`FlowQuery.wants` judges a followed flow.

- ``number`` N: the last N matching flows (``first``: the oldest N); 0 with no ``since``: the
  whole ring, unless following (then only new flows);
- ``since`` / ``until``: flow time bounds (inclusive); ``until`` ends a followed stream as soon
  as a newer flow arrives;
- ``field_mask``: only the named Flow fields are sent; a path naming a published field Ciliary
  never sets selects nothing; a path that names no published field is refused.

The whitelist also gives a first pass over the raw events (``hubble_prefilter``): a ring entry not
converted yet that it rejects is neither converted nor judged by the full filter (an entry already
converted goes straight to the full filter, which is as cheap on a kept flow); what is sent is what the
full filter selects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import field_mask_pb2

from ciliary.hubbleapi import flow_pb2, observer_pb2
from ciliary.nodeagent import hubble_convert, hubble_filter, hubble_prefilter


def flow_of(entry: object) -> flow_pb2.Flow:
    """The Hubble form of a ``flowapi.RingEntry``, converted once and cached on the entry."""
    flow = entry.flow  # type: ignore[attr-defined]
    if flow is None:
        event = entry.event  # type: ignore[attr-defined]
        rules = entry.rules_for(event.cookie) if event.cookie else ()  # type: ignore[attr-defined]
        flow = hubble_convert.to_flow(event, entry.index, rules, entry.index.revision)  # type: ignore[attr-defined]
        entry.flow = flow  # type: ignore[attr-defined]
    return flow


def response_wire(entry: object, node: str) -> bytes:
    """The serialized ``GetFlowsResponse`` of a ring entry's flow (whole, no field mask), built once and
    cached on the entry: sending a kept flow again costs no copy and no serialization."""
    wire = entry.wire  # type: ignore[attr-defined]
    if wire is None:
        wire = response_bytes(flow_of(entry), node)
        entry.wire = wire  # type: ignore[attr-defined]
    return wire


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FLOW_TAG = b"\x0a"  # GetFlowsResponse.flow: field 1, length-delimited
_NODE_NAME_TAG = _varint(1000 << 3 | 2)  # GetFlowsResponse.node_name
_TIME_TAG = _varint(1001 << 3 | 2)  # GetFlowsResponse.time


def response_bytes(flow: flow_pb2.Flow, node: str) -> bytes:
    """``GetFlowsResponse(flow=flow, node_name=node, time=flow.time).SerializeToString()``, byte for byte,
    written around the flow's own serialization: no response message built, the flow not copied into one."""
    body = flow.SerializeToString()
    parts = [_FLOW_TAG, _varint(len(body)), body]
    if node:
        name = node.encode()
        parts += [_NODE_NAME_TAG, _varint(len(name)), name]
    if flow.HasField("time"):
        stamp = flow.time.SerializeToString()
        parts += [_TIME_TAG, _varint(len(stamp)), stamp]
    return b"".join(parts)


def _nanos(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


PUBLISHED_FLOW_FIELDS = frozenset({
    "time", "uuid", "emitter", "verdict", "drop_reason", "auth_type", "ethernet", "IP", "l4", "tunnel", "source",
    "destination", "Type", "node_name", "node_labels", "source_names", "destination_names", "l7", "reply",
    "event_type", "source_service", "destination_service", "traffic_direction", "policy_match_type",
    "trace_observation_point", "trace_reason", "file", "ip_trace_id", "drop_reason_desc", "is_reply",
    "debug_capture_point", "interface", "proxy_port", "trace_context", "sock_xlate_point", "socket_cookie",
    "cgroup_id", "Summary", "extensions", "egress_allowed_by", "ingress_allowed_by", "egress_denied_by",
    "ingress_denied_by", "policy_log", "aggregate"})
"""Top-level fields of the published flow.Flow; the ones Ciliary's schema leaves out are never set."""


def _mask_paths(mask: field_mask_pb2.FieldMask) -> list[str]:
    """The paths of ``mask`` Ciliary's Flow has (others name fields it never sets); an unknown path raises."""
    kept = []
    for path in mask.paths:
        parts = path.split(".")
        if parts[0] not in PUBLISHED_FLOW_FIELDS:
            raise hubble_filter.FilterError("field_mask", path, "not a field of flow.Flow")
        descriptor: Any = flow_pb2.Flow.DESCRIPTOR
        for part in parts:
            if descriptor is None or part not in descriptor.fields_by_name:
                if descriptor is not flow_pb2.Flow.DESCRIPTOR and descriptor is not None and parts[0] in (
                        flow_pb2.Flow.DESCRIPTOR.fields_by_name):
                    raise hubble_filter.FilterError("field_mask", path, f"no field {part!r} there")
                break
            descriptor = descriptor.fields_by_name[part].message_type
        else:
            kept.append(path)
    return kept


@dataclass
class FlowQuery:
    matches: hubble_filter.Predicate
    number: int
    first: bool
    follow: bool
    since_ns: int | None
    until_ns: int | None
    mask: field_mask_pb2.FieldMask | None
    prefilter: hubble_prefilter.RawCheck | None = None
    """A necessary condition on a ring entry's raw event (None: every event may match)."""

    def _in_time(self, flow: flow_pb2.Flow) -> bool:
        t = _nanos(flow.time)
        return (self.since_ns is None or t >= self.since_ns) and (self.until_ns is None or t <= self.until_ns)

    def history(self, entries: Iterable[object]) -> list[flow_pb2.Flow]:
        """The kept flows to send first, oldest first."""
        return [entry.flow for entry in self.history_entries(entries)]

    def history_entries(self, entries: Iterable[object]) -> list[Any]:
        """The ring entries whose flows to send first, oldest first (each converted: ``entry.flow`` set)."""
        if self.follow and not self.number and self.since_ns is None:
            return []
        picked: list[Any] = []
        ordered = list(entries)
        if not self.first:
            ordered.reverse()  # newest first: stop after the last N
        timed = self.since_ns is not None or self.until_ns is not None
        matches, first_pass = self.matches, self.prefilter
        for entry in ordered:
            flow = entry.flow  # type: ignore[attr-defined]
            if flow is None:  # not converted yet: convert only what the first pass cannot rule out
                if first_pass is not None and not first_pass(entry.event, entry.index):  # type: ignore[attr-defined]
                    continue
                flow = flow_of(entry)
            if (not timed or self._in_time(flow)) and matches(flow):
                picked.append(entry)
                if self.number and len(picked) >= self.number:
                    break
        if not self.first:
            picked.reverse()
        return picked

    def may_want(self, entry: object) -> bool:
        """False when ``entry``'s flow cannot match (decided on the raw event, nothing converted)."""
        return self.prefilter is None or self.prefilter(entry.event, entry.index)  # type: ignore[attr-defined]

    def wants(self, flow: flow_pb2.Flow) -> bool:
        return self._in_time(flow) and self.matches(flow)

    def past_until(self, flow: flow_pb2.Flow) -> bool:
        return self.until_ns is not None and _nanos(flow.time) > self.until_ns

    def shape(self, flow: flow_pb2.Flow) -> flow_pb2.Flow:
        if self.mask is None:
            return flow
        out = flow_pb2.Flow()
        self.mask.MergeMessage(flow, out)
        return out


def plan(request: observer_pb2.GetFlowsRequest) -> FlowQuery:
    """Validate ``request``; raises ``hubble_filter.FilterError`` naming the offending field."""
    matches = hubble_filter.compile_filters(request.whitelist, request.blacklist)
    since = _nanos(request.since) if request.HasField("since") else None
    until = _nanos(request.until) if request.HasField("until") else None
    if since is not None and until is not None and until < since:
        raise hubble_filter.FilterError("until", str(request.until.ToJsonString()), "is before since")
    mask = None
    if request.HasField("field_mask") and request.field_mask.paths:
        mask = field_mask_pb2.FieldMask(paths=_mask_paths(request.field_mask))
    return FlowQuery(matches=matches, number=request.number, first=request.first, follow=request.follow,
                     since_ns=since, until_ns=until, mask=mask,
                     prefilter=hubble_prefilter.compile_prefilter(request.whitelist))
