"""Prometheus metrics of the operator, read from its loops' own bookkeeping at scrape time (pure: no HTTP).

The loops keep plain counters (``LoopStats`` of the policy and the load-balancing reconcilers, the
status handover's ``HandoverStats``, policies and their ``Valid`` conditions); :class:`OperatorMetrics`
turns them into families when Prometheus scrapes, so a scrape never slows a loop down:

- ``cilium_operator_reconcile_runs_total{loop}`` and ``cilium_operator_reconcile_duration_seconds{loop}``
  (histogram): finished passes of the policy (``policy``) and Service (``lb``) reconcilers and their
  duration (identities, resolution and the etcd writes);
- ``cilium_operator_intents_written_total{loop}``: per-node intents written to etcd (a pass writes only
  the nodes whose intent changed);
- ``cilium_operator_status_handover_writes_total{outcome}``: status writes of the handover (a policy's
  ``.status`` patch, or a NetworkPolicy's Event), ``success`` or ``fail`` (retried later);
  ``cilium_operator_status_handover_pending``: policies with a status change not written yet;
- ``cilium_policy`` (Cilium's name): the policies the operator holds; ``cilium_operator_policies{kind,
  valid}``: by kind (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy) and validity
  (``true``, ``false``: refused, ``unknown``: not validated yet);
- ``cilium_identity`` (Cilium's name): security identities allocated; ``cilium_nodes_all_num``
  (Cilium's name): nodes known.

Every label takes its values from a fixed small set (two loops, two outcomes, three kinds, three
validities): no policy, node or namespace names, so the series count does not grow with the cluster.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")
VALIDITIES = ("true", "false", "unknown")


@dataclass
class DurationHistogram:
    """Observations counted per upper bound (not cumulative), their sum and count."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), +Inf last."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


@dataclass
class LoopStats:
    """What one reconcile loop has done since the process started."""

    passes: int = 0
    written_total: int = 0
    durations: DurationHistogram = field(default_factory=DurationHistogram)

    def record(self, seconds: float, written: int) -> None:
        self.passes += 1
        self.written_total += written
        self.durations.observe(seconds)


def validity(condition: Mapping[str, Any] | None) -> str:
    """``true``/``false`` from a ``Valid`` condition; ``unknown`` when there is none yet."""
    status = (condition or {}).get("status")
    return {"True": "true", "False": "false"}.get(str(status), "unknown")


@dataclass
class HandoverView:
    """What the collector reads of the status handover (``StatusHandover`` fills it through callables)."""

    writes: Callable[[], int]
    failures: Callable[[], int]
    pending: Callable[[], int]
    policies: Callable[[], Iterable[tuple[str, str]]]
    """(kind, validity) of every policy held."""


class OperatorMetrics(Collector):
    def __init__(self, loops: Mapping[str, Callable[[], LoopStats]], handover: HandoverView | None,
                 identities: Callable[[], int], nodes: Callable[[], int]) -> None:
        self.loops = loops
        self.handover = handover
        self.identities = identities
        self.nodes = nodes

    def collect(self) -> Iterator[Any]:
        runs = CounterMetricFamily("cilium_operator_reconcile_runs", "Finished reconcile passes", labels=["loop"])
        written = CounterMetricFamily("cilium_operator_intents_written",
                                      "Per-node intents written to etcd", labels=["loop"])
        durations = HistogramMetricFamily("cilium_operator_reconcile_duration_seconds",
                                          "Duration of reconcile passes", labels=["loop"])
        for name, stats_of in sorted(self.loops.items()):
            stats = stats_of()
            runs.add_metric([name], stats.passes)
            written.add_metric([name], stats.written_total)
            durations.add_metric([name], stats.durations.cumulative(), stats.durations.total)
        yield from (runs, written, durations)
        if self.handover is not None:
            writes = CounterMetricFamily("cilium_operator_status_handover_writes",
                                         "Status writes of the handover (policy .status patches, NetworkPolicy "
                                         "Events)", labels=["outcome"])
            writes.add_metric(["success"], self.handover.writes())
            writes.add_metric(["fail"], self.handover.failures())
            yield writes
            yield GaugeMetricFamily("cilium_operator_status_handover_pending",
                                    "Policies with a status change not written yet", value=self.handover.pending())
            counts = {(kind, valid): 0 for kind in POLICY_KINDS for valid in VALIDITIES}
            for kind, valid in self.handover.policies():
                if (kind, valid) in counts:
                    counts[(kind, valid)] += 1
            yield GaugeMetricFamily("cilium_policy", "Policies held by the operator", value=sum(counts.values()))
            by_kind = GaugeMetricFamily("cilium_operator_policies", "Policies by kind and validity",
                                        labels=["kind", "valid"])
            for (kind, valid), n in counts.items():
                by_kind.add_metric([kind, valid], n)
            yield by_kind
        yield GaugeMetricFamily("cilium_identity", "Security identities allocated", value=self.identities())
        yield GaugeMetricFamily("cilium_nodes_all_num", "Nodes known to the operator", value=self.nodes())
