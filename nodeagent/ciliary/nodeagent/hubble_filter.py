"""Hubble ``flow.FlowFilter`` lists compiled into predicates over ``flow.Flow`` (pure: no gRPC, no I/O).

Semantics (as Hubble's server applies them): a flow passes when it matches at least one
whitelist filter (or the whitelist is empty) and no blacklist filter. Within one filter every
field that is set must match (AND); within one repeated field any value may match (OR).

``source_service`` / ``destination_service`` match as pods do (``namespace/name-prefix``) against the
Service a flow names (``hubble_convert``: a pod's connection opened through a Service frontend).
Fields about data Ciliary never records (FQDNs, workloads, cluster names, L7 HTTP and
DNS, trace IDs, translated source IPs, node labels) are checked for well-formedness and then match
no flow, which is what such a filter selects among Ciliary's flows. A field this module does not
know (sent by a newer client) and CEL expressions are refused with :class:`FilterError`, never
ignored: ignoring a filter would widen what a client sees.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import unknown_fields

from ciliary.hubbleapi import flow_pb2

Predicate = Callable[[flow_pb2.Flow], bool]

PROTOCOLS_L4 = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmp": "ICMPv4", "icmpv4": "ICMPv4",
                "icmpv6": "ICMPv6"}
PROTOCOLS_L7 = {"http", "dns", "kafka"}
HTTP_STATUS = re.compile(r"^[1-5](\d\d|\d\+|\+)$")
CLUSTER = "default"
"""The cluster name a node_name filter's ``cluster/`` prefix must match (Ciliary runs one cluster)."""


@dataclass
class FilterError(ValueError):
    """A filter that cannot be evaluated: ``field`` names the FlowFilter field, ``value`` what was sent."""

    field: str
    value: str
    problem: str

    def __str__(self) -> str:
        return f"invalid flow filter {self.field}={self.value!r}: {self.problem}"


# ---------------------------------------------------------------- label selectors

_REQ = re.compile(r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_.:/\-]+)\s*"
                  r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.\-]*)|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _label_key_matches(want: str, have_key: str) -> bool:
    """``want`` may carry a source (``k8s:app``); without one it matches the key under any source."""
    if ":" in want:
        return want == have_key
    return have_key.split(":", 1)[-1] == want


def _key_value(label: str) -> tuple[str, str]:
    key, _, value = label.partition("=")
    return key, value


def _requirement(key: str, neg: bool, op: str | None, setop: str | None, value: str | None,
                 members: str | None) -> Callable[[dict[str, str]], bool]:
    def values_of(labels: dict[str, str]) -> list[str]:
        return [v for k, v in labels.items() if _label_key_matches(key, k)]

    if setop:
        wanted = {v.strip() for v in (members or "").split(",") if v.strip()}
        if setop == "in":
            return lambda ls: any(v in wanted for v in values_of(ls))
        return lambda ls: not any(v in wanted for v in values_of(ls))
    if op in ("=", "=="):
        return lambda ls: (value or "") in values_of(ls)
    if op == "!=":
        return lambda ls: (value or "") not in values_of(ls)
    if neg:
        return lambda ls: not values_of(ls)
    return lambda ls: bool(values_of(ls))


def label_selector(field: str, selector: str) -> Callable[[Sequence[str]], bool]:
    """A Kubernetes-style label selector over Hubble labels (``source:key=value``)."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for raw in _split_selector(selector):
        m = _REQ.match(raw)
        if not raw.strip() or m is None:
            raise FilterError(field, selector, f"not a label selector requirement: {raw!r}")
        key, neg, op, setop = m["key"], m["neg"], m["op"], m["setop"]
        if neg and (op or setop):
            raise FilterError(field, selector, f"'!' only negates a bare key: {raw!r}")

        checks.append(_requirement(key, bool(neg), op, setop, m["value"], m["set"]))

    def matches(labels: Sequence[str]) -> bool:
        parsed = dict(_key_value(label) for label in labels)
        return all(check(parsed) for check in checks)

    return matches


# ---------------------------------------------------------------- one field each


def _ip_matcher(field: str, values: Iterable[str]) -> Callable[[str], bool]:
    nets = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise FilterError(field, value, "not an IP address or CIDR") from exc

    def matches(ip: str) -> bool:
        if not ip:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in nets)

    return matches


def _pod_matcher(field: str, values: Iterable[str], name: str = "pod_name") -> Callable[[Any], bool]:
    """``namespace/name-prefix`` values (``ns/``: the whole namespace) against an Endpoint's ``pod_name`` or a
    Service's ``name``."""
    wanted = []
    for value in values:
        namespace, sep, prefix = value.partition("/")
        if not sep:  # a bare name: the pod name prefix in any namespace... Hubble's CLI always sends ns/
            namespace, prefix = "", value
        wanted.append((namespace, prefix))

    def matches(ep: flow_pb2.Endpoint) -> bool:
        own = getattr(ep, name)
        return any((not ns or ep.namespace == ns) and own.startswith(prefix) and (prefix or ns)
                   for ns, prefix in wanted)

    return matches


def _port_set(field: str, values: Iterable[str]) -> set[int]:
    ports = set()
    for value in values:
        if not value.isdigit() or int(value) > 65535:
            raise FilterError(field, value, "not a port number (0-65535)")
        ports.add(int(value))
    return ports


def _l4_ports(flow: flow_pb2.Flow) -> tuple[int, int] | None:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        l4 = getattr(flow.l4, kind)
        return l4.source_port, l4.destination_port
    return None


def _node_matcher(values: Iterable[str]) -> Callable[[str], bool]:
    patterns = []
    for value in values:
        cluster, sep, node = value.rpartition("/")
        patterns.append((cluster if sep else "*", node or "*"))
    return lambda name: any(fnmatch.fnmatchcase(CLUSTER, c) and fnmatch.fnmatchcase(name, n) for c, n in patterns)


def _regexes(field: str, values: Iterable[str]) -> None:
    for value in values:
        try:
            re.compile(value)
        except re.error as exc:
            raise FilterError(field, value, f"not a regular expression: {exc}") from exc


def _never(_flow: flow_pb2.Flow) -> bool:
    return False


def compile_filter(f: flow_pb2.FlowFilter) -> Predicate:
    """One FlowFilter as a predicate (AND of its set fields)."""
    if unknown_fields.UnknownFieldSet(f) and len(unknown_fields.UnknownFieldSet(f)):
        numbers = sorted({u.field_number for u in unknown_fields.UnknownFieldSet(f)})
        raise FilterError("<unknown>", ",".join(map(str, numbers)), "filter fields this server does not know")
    checks: list[Predicate] = []
    if f.verdict:
        verdicts = set(f.verdict)
        checks.append(lambda fl: fl.verdict in verdicts)
    if f.source_ip:
        src_ip = _ip_matcher("source_ip", f.source_ip)
        checks.append(lambda fl: src_ip(fl.IP.source))
    if f.destination_ip:
        dst_ip = _ip_matcher("destination_ip", f.destination_ip)
        checks.append(lambda fl: dst_ip(fl.IP.destination))
    if f.source_pod:
        src_pod = _pod_matcher("source_pod", f.source_pod)
        checks.append(lambda fl: src_pod(fl.source))
    if f.destination_pod:
        dst_pod = _pod_matcher("destination_pod", f.destination_pod)
        checks.append(lambda fl: dst_pod(fl.destination))
    if f.source_service:
        src_svc = _pod_matcher("source_service", f.source_service, "name")
        checks.append(lambda fl: fl.HasField("source_service") and src_svc(fl.source_service))
    if f.destination_service:
        dst_svc = _pod_matcher("destination_service", f.destination_service, "name")
        checks.append(lambda fl: fl.HasField("destination_service") and dst_svc(fl.destination_service))
    if f.source_label:
        src_sel = [label_selector("source_label", s) for s in f.source_label]
        checks.append(lambda fl: any(sel(fl.source.labels) for sel in src_sel))
    if f.destination_label:
        dst_sel = [label_selector("destination_label", s) for s in f.destination_label]
        checks.append(lambda fl: any(sel(fl.destination.labels) for sel in dst_sel))
    if f.node_labels:
        node_sel = [label_selector("node_labels", s) for s in f.node_labels]
        checks.append(lambda fl: any(sel(fl.node_labels) for sel in node_sel))
    if f.source_identity:
        src_ids = set(f.source_identity)
        checks.append(lambda fl: fl.source.identity in src_ids)
    if f.destination_identity:
        dst_ids = set(f.destination_identity)
        checks.append(lambda fl: fl.destination.identity in dst_ids)
    if f.drop_reason_desc:
        reasons = set(f.drop_reason_desc)
        checks.append(lambda fl: fl.drop_reason_desc in reasons)
    if f.traffic_direction:
        directions = set(f.traffic_direction)
        checks.append(lambda fl: fl.traffic_direction in directions)
    if f.reply:
        replies = set(f.reply)
        checks.append(lambda fl: fl.HasField("is_reply") and fl.is_reply.value in replies)
    if f.ip_version:
        versions = set(f.ip_version)
        checks.append(lambda fl: fl.IP.ipVersion in versions)
    if f.encrypted:
        encrypted = set(f.encrypted)
        checks.append(lambda fl: fl.HasField("IP") and fl.IP.encrypted in encrypted)
    if f.event_type:
        kinds = [(e.type, e.match_sub_type, e.sub_type) for e in f.event_type]
        checks.append(lambda fl: any(fl.event_type.type == t and (not m or fl.event_type.sub_type == s)
                                     for t, m, s in kinds))
    if f.protocol:
        l4_kinds: set[str] = set()
        for value in f.protocol:
            name = value.lower()
            if name in PROTOCOLS_L4:
                l4_kinds.add(PROTOCOLS_L4[name])
            elif name not in PROTOCOLS_L7:
                raise FilterError("protocol", value, f"unknown protocol (one of {sorted([*PROTOCOLS_L4, *PROTOCOLS_L7])})")
        checks.append(lambda fl: fl.l4.WhichOneof("protocol") in l4_kinds)
    if f.source_port:
        src_ports = _port_set("source_port", f.source_port)
        checks.append(lambda fl: (p := _l4_ports(fl)) is not None and p[0] in src_ports)
    if f.destination_port:
        dst_ports = _port_set("destination_port", f.destination_port)
        checks.append(lambda fl: (p := _l4_ports(fl)) is not None and p[1] in dst_ports)
    if f.tcp_flags:
        wanted_flags = [[name for name in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
                         if getattr(flags, name)] for flags in f.tcp_flags]
        checks.append(lambda fl: fl.l4.WhichOneof("protocol") == "TCP" and any(
            all(getattr(fl.l4.TCP.flags, name) for name in names) for names in wanted_flags))
    if f.node_name:
        node = _node_matcher(f.node_name)
        checks.append(lambda fl: node(fl.node_name))
    if f.interface:
        ifaces = [(i.index, i.name) for i in f.interface]
        checks.append(lambda fl: any((not idx or fl.interface.index == idx) and (not name or fl.interface.name == name)
                                     for idx, name in ifaces))
    for field in ("source_ip_xlated",):
        if getattr(f, field):
            _ip_matcher(field, getattr(f, field))
            checks.append(_never)
    if f.http_status_code:
        for value in f.http_status_code:
            if not HTTP_STATUS.match(value):
                raise FilterError("http_status_code", value, "not a status code or prefix like 404, 40+ or 5+")
        checks.append(_never)
    for field in ("dns_query", "http_path", "http_url"):
        if getattr(f, field):
            _regexes(field, getattr(f, field))
            checks.append(_never)
    # data Ciliary never records: such a filter matches no flow
    for field in ("uuid", "source_fqdn", "destination_fqdn",
                  "source_workload", "destination_workload", "source_cluster_name", "destination_cluster_name",
                  "http_method", "http_header", "trace_id", "ip_trace_id"):
        if len(getattr(f, field)):
            checks.append(_never)
    if f.HasField("experimental") and f.experimental.cel_expression:
        raise FilterError("experimental.cel_expression", f.experimental.cel_expression[0],
                          "CEL expressions are not supported by Ciliary")
    return _all_of(checks)


def _all_of(checks: Sequence[Predicate]) -> Predicate:
    if not checks:
        return lambda _fl: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda fl: first(fl) and second(fl)

    def every(fl: flow_pb2.Flow) -> bool:
        for check in checks:
            if not check(fl):
                return False
        return True

    return every


def _any_of(predicates: Sequence[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda fl: first(fl) or second(fl)

    def some(fl: flow_pb2.Flow) -> bool:
        for predicate in predicates:
            if predicate(fl):
                return True
        return False

    return some


def compile_filters(whitelist: Iterable[flow_pb2.FlowFilter],
                    blacklist: Iterable[flow_pb2.FlowFilter]) -> Predicate:
    """(OR of the whitelist, or everything when it is empty) AND NOT (OR of the blacklist)."""
    allow = [compile_filter(f) for f in whitelist]
    deny = [compile_filter(f) for f in blacklist]
    if not deny:
        return _any_of(allow) if allow else (lambda _fl: True)
    denied = _any_of(deny)
    if not allow:
        return lambda fl: not denied(fl)
    allowed = _any_of(allow)
    return lambda fl: allowed(fl) and not denied(fl)
