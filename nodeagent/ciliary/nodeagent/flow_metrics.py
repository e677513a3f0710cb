"""Prometheus metrics of the agent's flows, named as Hubble and Cilium name them (pure: no HTTP).

The flow hub counts every published event by (verdict, reason, protocol, direction, TCP flags)
(``FlowHub.counts``, one dict update per event); :class:`FlowMetrics` turns those counts into
families at scrape time:

- ``hubble_flows_processed_total{type, subtype, verdict, protocol}`` (type Drop or Trace,
  subtype the observation point: to-endpoint, from-endpoint; empty for drops);
- ``hubble_drop_total{reason, protocol}`` (reason = Hubble's DropReason name);
- ``hubble_tcp_flags_total{flag, family}`` (one count per flag set, family IPv4 or IPv6);
- ``hubble_lost_events_total{source}`` (perf_event_ring_buffer: the kernel ring was full;
  observer_events_queue: the agent's reader or a follower had no room);
- ``cilium_drop_count_total{reason, direction}`` and ``cilium_forward_count_total{direction}``
  (packets; Cilium also counts bytes, which the flow events do not carry per direction here);
- ``hubble_flow_ring_size`` / ``hubble_flow_ring_capacity`` (the ring's fill, the "map pressure"
  of the observer).

Every label takes values from small fixed sets (verdicts, reasons, protocols, directions, flags):
the series count is bounded whatever the traffic. No port, pod or identity labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ciliary.hubbleapi import flow_pb2
from ciliary.nodeagent import hubble_convert

PROTOCOLS = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

CountKey = tuple[str, str, int, str, int, bool]
"""(verdict, reason name, IP protocol, direction, TCP flags, IPv6) as ``FlowHub`` counts them."""


def count_key(event: Any) -> CountKey:
    return (event.verdict, getattr(event.reason, "name", str(event.reason)), event.protocol, event.direction,
            event.tcp_flags if event.protocol == 6 else 0, event.src.version == 6)


def _add_all(family: CounterMetricFamily, values: Mapping[tuple[str, ...], int]) -> None:
    for labels, n in sorted(values.items()):
        family.add_metric(list(labels), n)


class FlowMetrics(Collector):
    """Collects from ``counts()`` (the hub's counter), ``lost()`` ({source: n}) and ``ring()`` (size, capacity)."""

    def __init__(self, counts: Callable[[], Mapping[CountKey, int]], lost: Callable[[], Mapping[str, int]],
                 ring: Callable[[], tuple[int, int]]) -> None:
        self.counts = counts
        self.lost = lost
        self.ring = ring

    def collect(self) -> Iterator[Any]:
        processed: dict[tuple[str, ...], int] = {}
        drops: dict[tuple[str, ...], int] = {}
        flags: dict[tuple[str, ...], int] = {}
        cilium_drops: dict[tuple[str, ...], int] = {}
        cilium_forwards: dict[str, int] = {}
        for (verdict, reason, proto, direction, tcp_flags, v6), n in dict(self.counts()).items():
            protocol = PROTOCOLS.get(proto, "Unknown")
            dropped = verdict == "dropped"
            if dropped:
                code = hubble_convert.DROP_CODES.get(reason, flow_pb2.DROP_REASON_UNKNOWN)
                name = flow_pb2.DropReason.Name(code)
                key = ("Drop", "", "DROPPED", protocol)
                drops[name, protocol] = drops.get((name, protocol), 0) + n
                cilium_drops[name, direction.upper()] = cilium_drops.get((name, direction.upper()), 0) + n
            else:
                key = ("Trace", "to-endpoint" if direction == "ingress" else "from-endpoint", "FORWARDED", protocol)
                cilium_forwards[direction.upper()] = cilium_forwards.get(direction.upper(), 0) + n
            processed[key] = processed.get(key, 0) + n
            for bit, flag in hubble_convert.TCP_FLAG_FIELDS:
                if tcp_flags & bit:
                    fam = "IPv6" if v6 else "IPv4"
                    flags[flag, fam] = flags.get((flag, fam), 0) + n
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
