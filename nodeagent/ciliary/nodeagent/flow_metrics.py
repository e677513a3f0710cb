"""Prometheus metrics of the agent's flows, named as Hubble and Cilium name them (pure: no HTTP).

The flow hub counts every published event by (verdict, reason, protocol, direction, TCP flags, family)
(``FlowHub.counts``, one dict update per event); at each scrape :class:`FlowCounts` folds the keys counted
since the last one into per-series totals (a scrape costs the series, not the tens of thousands of count keys)
and :class:`FlowMetrics` turns the totals into families:

- ``hubble_flows_processed_total{type, subtype, verdict, protocol}`` (type Drop or Trace,
  subtype the observation point: to-endpoint, from-endpoint; empty for drops);
- ``hubble_drop_total{reason, protocol}`` (reason = Hubble's DropReason name);
- ``hubble_tcp_flags_total{flag, family}`` (one count per flag set, family IPv4 or IPv6);
- ``hubble_lost_events_total{source}`` (perf_event_ring_buffer: the kernel ring was full;
  observer_events_queue: the agent's reader or a follower had no room);
- ``cilium_drop_count_total{reason, direction}`` and ``cilium_forward_count_total{direction}``
  (packets; Cilium also counts bytes, which the flow events do not carry per direction here);
- ``hubble_flow_ring_size`` / ``hubble_flow_ring_capacity`` (the ring's fill, the "map pressure"
  of the observer);
- ``hubble_policy_verdicts_total{direction, match, action}``: the policy's verdicts on new traffic: drops,
  a TCP SYN without ACK, another protocol's first packet; not replies, not a connection's later reports (FIN/RST,
  the monitor interval's, ``none``'s every packet: ``established`` in the event), not unenforced endpoints. ``match`` says what decided, as Hubble names it: ``none`` (no rule:
  default deny), the kind of the allow or deny entry the datapath found (``l3-only``: the peer named, any port;
  ``l3-l4``: peer and port; ``l4-only``: a port for any peer; ``all``: any peer, any port; ``l3-proto`` and
  ``proto-only``: a protocol with any port; ``allow``/``deny`` only from a program older than the match
  types), ``l7/http`` (handed to the node's HTTP proxy), ``l7/dns`` (the DNS proxy); ``action`` forwarded,
  dropped or redirected (to a proxy);
- ``hubble_port_distribution_total{protocol, port}``: forwarded new TCP/UDP/SCTP traffic (as above) by
  destination port; the first :data:`MAX_PORTS` ports seen per protocol get their own series, the others count as
  ``port="other"``;
- ``hubble_http_requests_total{method, protocol, reporter}``, ``hubble_http_responses_total{method,
  status, reporter}``, ``hubble_http_request_duration_seconds{method, reporter}`` (histogram): the
  requests the node's Envoy judged (``reporter`` server for a pod's ingress, client for its egress;
  methods outside the standard ones, status codes outside the registered ones and protocols other than
  HTTP/1.0, 1.1, 2 and 3 count as ``other``);
- ``hubble_dns_queries_total{qtypes}``, ``hubble_dns_responses_total{rcode, qtypes, ips_returned}``:
  the exchanges of the node's DNS proxy (a refused name counts as answered ``REFUSED``; record types
  and response codes outside a fixed list count as ``other``, ``ips_returned`` above 10 as ``10+``).

Every label takes values from fixed sets (verdicts, reasons, protocols, directions, flags, HTTP methods,
versions and registered status codes, DNS record types and codes) or a capped one (ports): the series
count is bounded whatever the traffic (``bench/bench_metrics.py`` measures the scrape with every one of
them present). No pod or identity labels.
"""

from __future__ import annotations

import collections
import http
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ciliary.hubbleapi import flow_pb2
from ciliary.nodeagent import hubble_convert

PROTOCOLS = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

CountKey = tuple[str, str, int, str, int, bool]
"""(verdict, reason name, IP protocol, direction, TCP flags, IPv6) as ``FlowHub`` counts them."""

MAX_PORTS = 256
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MATCH = {"OK_POLICY": ("allow", "forwarded"), "DROP_POLICY": ("none", "dropped"),
          "DROP_POLICY_DENY": ("deny", "dropped"), "OK_PROXY": ("proxy", "redirected"),
          "DNS_ALLOWED": ("l7/dns", "forwarded"), "DNS_REFUSED": ("l7/dns", "dropped")}
_PORTED = (6, 17, 132)
DNS_QTYPES = frozenset({"A", "AAAA", "ANY", "CAA", "CNAME", "DNSKEY", "DS", "HTTPS", "MX", "NAPTR", "NS", "PTR",
                        "SOA", "SRV", "SVCB", "TXT"})
DNS_RCODES = frozenset({"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
                        "NXRRSET", "NOTAUTH", "NOTZONE", "BADVERS"})
HTTP_STATUSES = frozenset(str(s.value) for s in http.HTTPStatus)
_TCP_SYN, _TCP_ACK = 0x02, 0x10


def _opens(event: Any) -> bool:
    """Is ``event`` (not a reply) the verdict on a new flow: a drop, a TCP SYN without ACK, or another protocol's
    first packet? Not a connection's later reports (its FIN or RST, the monitor interval's, every packet's with
    ``--monitor-aggregation none``: the datapath marks them ``established``)."""
    if event.verdict == "dropped":
        return True
    if event.protocol == 6:
        return event.tcp_flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN
    return not getattr(event, "established", False)


def count_key(event: Any) -> CountKey:
    return (event.verdict, getattr(event.reason, "name", str(event.reason)), event.protocol, event.direction,
            event.tcp_flags if event.protocol == 6 else 0, event.src.version == 6)


class DetailCounter:
    """The counts of the per-kind metrics (policy verdicts, ports, HTTP, DNS), one :meth:`add` per published
    event. Replies add nothing; labels are bounded as the module says."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.ports: dict[int, set[int]] = {}

    def add(self, event: Any) -> None:
        if event.is_reply:
            return
        request = getattr(event, "http", None)
        if request is not None:
            method = request.method if request.method in HTTP_METHODS else "other"
            reporter = "server" if event.direction == "ingress" else "client"
            protocol = request.protocol if request.protocol in ("HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3") else "other"
            self.counts["http_req", method, protocol, reporter] += 1
            if request.code:
                status = str(request.code) if str(request.code) in HTTP_STATUSES else "other"
                self.counts["http_resp", method, status, reporter] += 1
            seconds = request.duration_ms / 1000
            bucket = next((str(b) for b in DURATION_BUCKETS if seconds <= b), "+Inf")
            self.counts["http_dur", method, reporter, bucket] += 1
            self.counts["http_sum_ms", method, reporter] += request.duration_ms
            self.counts["verdict", event.direction, "l7/http",
                        "forwarded" if event.verdict == "forwarded" else "dropped"] += 1
            return
        reason = getattr(event.reason, "name", str(event.reason))
        l7 = getattr(event, "l7", None)
        if l7 and l7.get("type") == "dns":
            qtype = str(l7.get("qtype", ""))
            qtype = qtype if qtype in DNS_QTYPES else "other"
            rcode = str(l7.get("rcode", ""))
            rcode = rcode if rcode in DNS_RCODES else "other"
            ips = len(l7.get("ips", ()))
            self.counts["dns_q", qtype] += 1
            self.counts["dns_r", rcode, qtype, "10+" if ips > 10 else str(ips)] += 1
        elif not _opens(event):
            return  # a tracked connection's later flags (medium aggregation): not a verdict on new traffic
        match = _MATCH.get(reason)
        if match is not None:
            kind, action = match
            if kind == "proxy":
                kind = "l7/dns" if event.direction == "egress" and event.dport == 53 else "l7/http"
            elif kind in ("allow", "deny"):
                match_type: int = getattr(event, "match_type", 0)
                kind = hubble_convert.MATCH_TYPES.get(match_type, kind) if match_type else kind
            self.counts["verdict", event.direction, kind, action] += 1
        if event.verdict == "forwarded" and event.protocol in _PORTED and not l7:
            seen = self.ports.setdefault(event.protocol, set())
            if event.dport not in seen and len(seen) < MAX_PORTS:
                seen.add(event.dport)
            port = str(event.dport) if event.dport in seen else "other"
            self.counts["port", PROTOCOLS[event.protocol], port] += 1


def _add_all(family: CounterMetricFamily, values: Mapping[tuple[str, ...], int]) -> None:
    for labels, n in sorted(values.items()):
        family.add_metric(list(labels), n)


_Plan = tuple[tuple[str, ...], tuple[str, str] | None, tuple[str, str] | None, str | None, tuple[tuple[str, str], ...]]
"""(hubble_flows_processed labels, hubble_drop labels, cilium_drop_count labels, cilium_forward_count direction,
hubble_tcp_flags labels per flag set) of one count key."""


def _plan(count_key: CountKey) -> _Plan:
    verdict, reason, proto, direction, tcp_flags, v6 = count_key
    protocol = PROTOCOLS.get(proto, "Unknown")
    family = "IPv6" if v6 else "IPv4"
    flag_keys = tuple((flag, family) for bit, flag in hubble_convert.TCP_FLAG_FIELDS if tcp_flags & bit)
    if verdict == "dropped":
        name = flow_pb2.DropReason.Name(hubble_convert.DROP_CODES.get(reason, flow_pb2.DROP_REASON_UNKNOWN))
        return ("Drop", "", "DROPPED", protocol), (name, protocol), (name, direction.upper()), None, flag_keys
    subtype = "to-endpoint" if direction == "ingress" else "from-endpoint"
    return ("Trace", subtype, "FORWARDED", protocol), None, None, direction.upper(), flag_keys


class FlowCounts:
    """The counts behind the flow families. The hub adds one to ``pending[count_key(event)]`` per event (its hot
    path: one dict update); :meth:`fold` moves what is pending into one total per series and empties it. A scrape
    folds, then reads the totals: it costs the series plus the count keys that changed since the last scrape, never
    every count key the agent ever saw (tens of thousands: every TCP flag set of every verdict, reason, protocol,
    direction and family). The hub publishes and the agent scrapes on one event loop, synchronously: the fold's swap
    of ``pending`` needs no lock."""

    def __init__(self) -> None:
        self.pending: collections.Counter[CountKey] = collections.Counter()
        self.processed: dict[tuple[str, ...], int] = {}
        """hubble_flows_processed: (type, subtype, verdict, protocol) -> flows."""
        self.drops: dict[tuple[str, ...], int] = {}
        """hubble_drop: (reason, protocol) -> flows."""
        self.flags: dict[tuple[str, ...], int] = {}
        """hubble_tcp_flags: (flag, family) -> flows."""
        self.cilium_drops: dict[tuple[str, ...], int] = {}
        """cilium_drop_count: (reason, direction) -> packets."""
        self.cilium_forwards: dict[str, int] = {}
        """cilium_forward_count: direction -> packets."""
        self.folded = 0
        """Count keys folded so far (one per key per fold that found it pending)."""
        self._plans: dict[CountKey, _Plan] = {}
        """Each count key's series, worked out once (the keys are bounded: ``count_key``)."""

    def fold(self) -> None:
        pending, self.pending = self.pending, collections.Counter()
        plans, processed, drops, flags = self._plans, self.processed, self.drops, self.flags
        cilium_drops, cilium_forwards = self.cilium_drops, self.cilium_forwards
        for count_key, n in pending.items():
            plan = plans.get(count_key)
            if plan is None:
                plan = plans[count_key] = _plan(count_key)
            key, drop, cilium_drop, forward, flag_keys = plan
            processed[key] = processed.get(key, 0) + n
            if drop is not None and cilium_drop is not None:
                drops[drop] = drops.get(drop, 0) + n
                cilium_drops[cilium_drop] = cilium_drops.get(cilium_drop, 0) + n
            if forward is not None:
                cilium_forwards[forward] = cilium_forwards.get(forward, 0) + n
            for flag_key in flag_keys:
                flags[flag_key] = flags.get(flag_key, 0) + n
        self.folded += len(pending)


class FlowMetrics(Collector):
    """Collects from ``counts`` (the hub's, folded at each collect), ``lost()`` ({source: n}), ``ring()`` (size,
    capacity) and ``details()`` (:class:`DetailCounter` counts)."""

    def __init__(self, counts: FlowCounts, lost: Callable[[], Mapping[str, int]],
                 ring: Callable[[], tuple[int, int]],
                 details: Callable[[], Mapping[tuple[str, ...], int]] = dict) -> None:
        self.counts = counts
        self.lost = lost
        self.ring = ring
        self.details = details

    def collect(self) -> Iterator[Any]:
        counts = self.counts
        counts.fold()
        processed, drops, flags = counts.processed, counts.drops, counts.flags
        cilium_drops, cilium_forwards = counts.cilium_drops, counts.cilium_forwards
        family = CounterMetricFamily("hubble_flows_processed", "Flows processed by the agent's observer",
                                     labels=["type", "subtype", "verdict", "protocol"])
        _add_all(family, processed)
        yield family
        family = CounterMetricFamily("hubble_drop", "Dropped flows by drop reason", labels=["reason", "protocol"])
        _add_all(family, drops)
        yield family
        family = CounterMetricFamily("hubble_tcp_flags", "TCP flags seen in flows", labels=["flag", "family"])
        _add_all(family, flags)
        yield family
        family = CounterMetricFamily("hubble_lost_events", "Flow events lost before a client saw them",
                                     labels=["source"])
        for source, n in sorted(self.lost().items()):
            family.add_metric([source], n)
        yield family
        family = CounterMetricFamily("cilium_drop_count", "Packets dropped by the datapath",
                                     labels=["reason", "direction"])
        _add_all(family, cilium_drops)
        yield family
        family = CounterMetricFamily("cilium_forward_count", "Packets forwarded by the datapath's policy programs",
                                     labels=["direction"])
        for direction, n in sorted(cilium_forwards.items()):
            family.add_metric([direction], n)
        yield family
        size, capacity = self.ring()
        yield GaugeMetricFamily("hubble_flow_ring_size", "Flows kept in the agent's flow ring", value=size)
        yield GaugeMetricFamily("hubble_flow_ring_capacity", "Capacity of the agent's flow ring", value=capacity)
        yield from detail_families(dict(self.details()))


def detail_families(details: Mapping[tuple[str, ...], int]) -> Iterator[Any]:
    """The per-kind families from :class:`DetailCounter` counts."""
    by_kind: dict[str, dict[tuple[str, ...], int]] = {}
    for key, n in details.items():
        by_kind.setdefault(key[0], {})[key[1:]] = n
    for kind, name, doc, labels in (
            ("verdict", "hubble_policy_verdicts", "Policy verdicts on new traffic", ["direction", "match", "action"]),
            ("port", "hubble_port_distribution", "Forwarded new traffic by destination port", ["protocol", "port"]),
            ("http_req", "hubble_http_requests", "HTTP requests judged by the node's proxy",
             ["method", "protocol", "reporter"]),
            ("http_resp", "hubble_http_responses", "HTTP responses seen by the node's proxy",
             ["method", "status", "reporter"]),
            ("dns_q", "hubble_dns_queries", "DNS queries seen by the node's DNS proxy", ["qtypes"]),
            ("dns_r", "hubble_dns_responses", "DNS responses given by the node's DNS proxy",
             ["rcode", "qtypes", "ips_returned"])):
        family = CounterMetricFamily(name, doc, labels=labels)
        _add_all(family, by_kind.get(kind, {}))
        yield family
    histogram = HistogramMetricFamily("hubble_http_request_duration_seconds", "HTTP request duration at the "
                                      "node's proxy", labels=["method", "reporter"])
    durations = by_kind.get("http_dur", {})
    sums = by_kind.get("http_sum_ms", {})
    for method, reporter in sorted({(m, r) for m, r, _b in durations}):
        cumulative, buckets = 0, []
        for bound in (*map(str, DURATION_BUCKETS), "+Inf"):
            cumulative += durations.get((method, reporter, bound), 0)
            buckets.append((bound, cumulative))
        histogram.add_metric([method, reporter], buckets, sums.get((method, reporter), 0) / 1000)
    yield histogram


_EXPOSED_TYPES = {"counter", "gauge", "histogram"}


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def text_exposition(families: Iterable[Any]) -> bytes:
    """Prometheus text format 0.0.4 of counter, gauge and histogram ``families`` (what the agent's collectors
    yield), written directly: about twice as fast as ``prometheus_client.generate_latest`` for thousands of
    series (``bench/bench_metrics.py``); ``promtool check metrics`` accepts it
    (``tests/unit/nodeagent/test_flow_metrics.py``)."""
    out: list[str] = []
    for family in families:
        if family.type not in _EXPOSED_TYPES:
            raise ValueError(f"metric family {family.name}: type {family.type} is not exposed here")
        name = f"{family.name}_total" if family.type == "counter" else family.name
        doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sample.labels.items())
                out.append(f"{sample.name}{{{labels}}} {_number(sample.value)}\n")
            else:
                out.append(f"{sample.name} {_number(sample.value)}\n")
    return "".join(out).encode()
