"""The operator's Prometheus metrics: names and values from the loops' bookkeeping, the handover's writes
and policy validity read from a real StatusHandover (fake API), bounded series, an exposition that
``promtool check metrics`` accepts, and the ``/metrics`` HTTP route (a taken address does not stop it)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from typing import Any

import prometheus_client
from test_handover_shell import UID, cnp, feed, flush_all, make

from ciliary.operator import main, operator_metrics
from ciliary.operator.operator_metrics import DurationHistogram, LoopStats, OperatorMetrics


def samples(registry: prometheus_client.CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


def registry_of(collector: OperatorMetrics) -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def netpol(uid: str) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": uid, "namespace": "ns", "uid": uid, "generation": 1,
                                                  "resourceVersion": "3"}}


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    h = DurationHistogram()
    for seconds in (0.001, 0.005, 0.3, 99.0):
        h.observe(seconds)
    buckets = dict(h.cumulative())
    assert buckets["0.005"] == 2  # le: 0.005 itself counts
    assert buckets["0.25"] == 2 and buckets["0.5"] == 3 and buckets["30.0"] == 3 and buckets["+Inf"] == 4
    assert h.count == 4 and abs(h.total - 99.306) < 1e-9


async def test_loops_handover_and_validity_as_series() -> None:
    handover, fake = make(cnp())
    handover.validated(UID, {"type": "Valid", "status": "True", "reason": "Validated", "message": "ok",
                             "observedGeneration": 1})
    feed(handover, ["a"])
    await flush_all(handover)
    handover.observe_policy({**cnp(), "kind": "CiliumClusterwideNetworkPolicy",
                             "metadata": {"name": "c", "uid": "u-2", "generation": 1, "resourceVersion": "4"}})
    handover.validated("u-2", {"type": "Valid", "status": "False", "reason": "InvalidPolicy", "message": "x",
                               "observedGeneration": 1})
    handover.observe_policy(netpol("u-3"))
    policy, lb = LoopStats(), LoopStats()
    policy.record(0.02, 2)
    policy.record(0.2, 0)
    lb.record(0.001, 1)
    registry = registry_of(OperatorMetrics({"policy": lambda: policy, "lb": lambda: lb}, handover.metrics_view(),
                                           identities=lambda: 5, nodes=lambda: 2))
    got = samples(registry)
    assert got["cilium_operator_reconcile_runs_total", (("loop", "policy"),)] == 2
    assert got["cilium_operator_reconcile_runs_total", (("loop", "lb"),)] == 1
    assert got["cilium_operator_intents_written_total", (("loop", "policy"),)] == 2
    assert got["cilium_operator_reconcile_duration_seconds_count", (("loop", "policy"),)] == 2
    assert got["cilium_operator_reconcile_duration_seconds_bucket", (("le", "0.025"), ("loop", "policy"))] == 1
    assert abs(got["cilium_operator_reconcile_duration_seconds_sum", (("loop", "policy"),)] - 0.22) < 1e-9
    assert len(fake.patches) == 1
    assert got["cilium_operator_status_handover_writes_total", (("outcome", "success"),)] == 1
    assert got["cilium_operator_status_handover_writes_total", (("outcome", "fail"),)] == 0
    assert got["cilium_policy", ()] == 3
    valid = {labels: n for (name, labels), n in got.items() if name == "cilium_operator_policies" and n}
    assert valid == {(("kind", "CiliumNetworkPolicy"), ("valid", "true")): 1,
                     (("kind", "CiliumClusterwideNetworkPolicy"), ("valid", "false")): 1,
                     (("kind", "NetworkPolicy"), ("valid", "unknown")): 1}
    assert got["cilium_identity", ()] == 5 and got["cilium_nodes_all_num", ()] == 2
    assert got["cilium_operator_status_handover_pending", ()] == handover.schedule.pending

    # bounded: more policies, passes and writes add no series
    before = set(got)
    for i in range(200):
        handover.observe_policy(netpol(f"n-{i}"))
        policy.record(i / 100, i)
    assert set(samples(registry)) == before


async def test_a_failed_status_write_is_counted_as_fail() -> None:
    class Refusing:
        async def patch_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> dict[str, Any]:
            from kubernetes_asyncio.client.rest import ApiException
            raise ApiException(status=500, reason="boom")

    handover, _ = make(cnp())
    handover.custom = Refusing()  # type: ignore[assignment]
    feed(handover, ["a"])
    await flush_all(handover)
    view = handover.metrics_view()
    assert (view.writes(), view.failures()) == (0, 1)


async def test_exposition_passes_promtool(tool: Any) -> None:
    handover, _ = make(cnp())
    registry = registry_of(OperatorMetrics({"policy": LoopStats, "lb": LoopStats}, handover.metrics_view(),
                                           identities=lambda: 0, nodes=lambda: 0))
    text = prometheus_client.generate_latest(registry).decode()
    check = subprocess.run([str(tool("promtool")), "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr + text


def test_validity_of_a_condition() -> None:
    assert operator_metrics.validity({"type": "Valid", "status": "True"}) == "true"
    assert operator_metrics.validity({"type": "Valid", "status": "False"}) == "false"
    assert operator_metrics.validity(None) == "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_route_and_a_taken_address() -> None:
    import asyncio

    registry = registry_of(OperatorMetrics({"policy": LoopStats}, None, identities=lambda: 3, nodes=lambda: 1))
    port = free_port()
    runner = await main.serve_metrics(registry, f"127.0.0.1:{port}")
    assert runner is not None
    try:
        def get() -> tuple[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()

        content_type, body = await asyncio.to_thread(get)
        assert content_type.startswith("text/plain") and "cilium_identity 3.0" in body
        assert await main.serve_metrics(registry, f"127.0.0.1:{port}") is None  # taken: logged, not raised
    finally:
        await runner.cleanup()


def test_the_flag_accepts_host_port_or_off() -> None:
    assert main._metrics_address("off") == "" and main._metrics_address("127.0.0.1:9963") == "127.0.0.1:9963"
    for bad in ("9963", "host:port", "h:70000"):
        try:
            main._metrics_address(bad)
        except Exception as exc:  # noqa: BLE001
            assert bad in str(exc)
        else:
            raise AssertionError(bad)
    assert json.loads(json.dumps(main.build_parser().parse_args([]).prometheus_serve_addr)) == "off"
