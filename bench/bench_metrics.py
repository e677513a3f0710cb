"""Scrape time of the agent's ``/metrics``, judged by a real Prometheus (Debian's, installed by the set-up).

  .venv/bin/python bench/bench_metrics.py [--series 10000] [--scrapes 20] [--smoke] [--publish-only]

The agent's real HTTP listener (``health.build_app`` with ``flowapi.add_routes``, the routes the agent
serves) runs in this process on loopback, with a flow hub whose counters hold every label combination
the agent can export (every verdict x drop reason x protocol x direction x TCP flag set x address
family, and every value of the per-kind metrics' labels, ports at their cap): the most series Ciliary's
flow metrics can ever have, since every label is bounded (``flow_metrics``). A second target pads the
same registry with synthetic counter series up to ``--series`` in all, to measure what a larger scrape
costs on the same path (the collectors and ``flow_metrics.text_exposition`` inside the agent's aiohttp
handler).

Prometheus scrapes both targets every second, left alone for ``--scrapes`` seconds; the figures are its
own ``scrape_duration_seconds`` (median and max over the scrapes of that window, read afterwards) and
``scrape_samples_scraped``, plus the CPU of the agent's ``/metrics`` handler per scrape (its thread's CPU
time, less noisy than wall time on a shared machine), Prometheus's CPU over the window per scrape, and
the exposition alone: steady (nothing counted since the last scrape) and after every count key
changed (the most a scrape folds: ``flow_metrics.FlowCounts``). Target (issue 11): a scrape < 50 ms
with 10k series.

First it measures the hot path the counting sits on: CPU per event of ``FlowHub.publish`` (batches of
256 events of mixed verdicts, protocols and TCP flags; median of 7 runs), the figure to compare before
and after a change to the counting (``--publish-only`` prints just that).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("operator", "nodeagent", "e2e")]

from aiohttp import web  # noqa: E402
from prometheus_client.core import CounterMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from ciliary.nodeagent import flow_metrics, flowapi, health, hubble_convert  # noqa: E402
from ciliary.nodeagent.datapath import flows, maps  # noqa: E402

TCP_FLAGS = range(0, 0x100)  # FIN SYN RST PSH ACK URG ECE CWR in every combination


class Registration:
    etcd_connected = True
    registered = True


class Padding(Collector):
    """``n`` counter series of one family (20 label values per label, like a per-pod metric)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily("bench_padding", "Synthetic series", labels=["namespace", "pod", "port"])
        for i in range(self.n):
            family.add_metric([f"ns-{i % 20}", f"pod-{i // 20}", str(i % 7)], i)
        yield family


def fill_counts(hub: flowapi.FlowHub) -> None:
    """Every count key the agent can hold (``flow_metrics.count_key``), counted as the hub counts an event."""
    for verdict, reason, proto, direction, v6 in product(("forwarded", "dropped"), maps.Reason, (1, 6, 17, 58, 132),
                                                         ("ingress", "egress"), (False, True)):
        for flags in (TCP_FLAGS if proto == 6 else (0,)):
            hub.counts.pending[(verdict, reason.name, proto, direction, flags, v6)] += 1 + flags


def fill(hub: flowapi.FlowHub) -> None:
    """Every count key the agent can hold (``fill_counts``) and every per-kind key
    (``flow_metrics.DetailCounter``: each label at every value it can take, ports at their cap)."""
    fill_counts(hub)
    details = hub.details.counts
    methods = (*sorted(flow_metrics.HTTP_METHODS), "other")
    reporters = ("server", "client")
    matches = ("deny", "allow", *hubble_convert.MATCH_TYPES.values(), "l7/http", "l7/dns")
    for direction, match, action in product(("ingress", "egress"), matches, ("forwarded", "dropped", "redirected")):
        details["verdict", direction, match, action] += 1
    for protocol in ("TCP", "UDP", "SCTP"):
        for port in (*map(str, range(1, flow_metrics.MAX_PORTS + 1)), "other"):
            details["port", protocol, port] += 1
    for method, reporter in product(methods, reporters):
        for version in ("HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3", "other"):
            details["http_req", method, version, reporter] += 1
        for status in (*sorted(flow_metrics.HTTP_STATUSES), "other"):
            details["http_resp", method, status, reporter] += 1
        for bucket in (*map(str, flow_metrics.DURATION_BUCKETS), "+Inf"):
            details["http_dur", method, reporter, bucket] += 1
        details["http_sum_ms", method, reporter] += 1
    for qtype in (*sorted(flow_metrics.DNS_QTYPES), "other"):
        details["dns_q", qtype] += 1
        for rcode in (*sorted(flow_metrics.DNS_RCODES), "other"):
            for ips in (*map(str, range(11)), "10+"):
                details["dns_r", rcode, qtype, ips] += 1


def events(n: int) -> list[Any]:
    """``n`` flow events of mixed verdicts, reasons, protocols, directions and TCP flags (as the datapath sends)."""
    src, dst = ipaddress.IPv4Address("10.0.1.5"), ipaddress.IPv4Address("10.0.0.2")
    mix = [("dropped", maps.Reason.DROP_POLICY, 6, 0x02), ("forwarded", maps.Reason.OK_POLICY, 6, 0x02),
           ("forwarded", maps.Reason.OK_REPLY, 6, 0x12), ("forwarded", maps.Reason.OK_POLICY, 6, 0x11),
           ("forwarded", maps.Reason.OK_POLICY, 17, 0), ("dropped", maps.Reason.DROP_POLICY_DENY, 1, 0)]
    out = []
    for i in range(n):
        verdict, reason, proto, tcp = mix[i % len(mix)]
        out.append(flows.FlowEvent(time=1.0, src=src, dst=dst, sport=40000 + i % 1000, dport=(80, 443, 53)[i % 3],
                                   protocol=proto, tcp_flags=tcp, verdict=verdict, reason=reason,
                                   direction=("ingress", "egress")[i % 2], is_reply=reason == maps.Reason.OK_REPLY,
                                   ep_id=1, src_identity=301, dst_identity=300, cookie=0, ifindex=7, length=60))
    return out


def publish_us_per_event(n: int = 20480, reps: int = 7) -> float:
    """Median CPU per event of ``FlowHub.publish`` (no followers), in batches of 256 like the reader's drain."""
    batch = events(n)
    times = []
    for _ in range(reps):
        hub = flowapi.FlowHub("bench")
        c0 = time.process_time()
        for i in range(0, n, 256):
            hub.publish(batch[i:i + 256])
        times.append((time.process_time() - c0) * 1e6 / n)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(padding: int, handler_ms: list[float]) -> tuple[web.AppRunner, int]:
    """The agent's app on loopback; each ``/metrics`` handler's thread CPU (ms) is appended to ``handler_ms``."""
    hub = flowapi.FlowHub("bench")
    fill(hub)
    app = health.build_app(health.HealthSources("bench", Registration(), []), [flowapi.add_routes(hub)])

    @web.middleware
    async def timed(request: web.Request, handler: Any) -> web.StreamResponse:
        c0 = time.thread_time()
        response = await handler(request)
        if request.path == "/metrics":
            handler_ms.append((time.thread_time() - c0) * 1000)
        return response

    app.middlewares.append(timed)
    if padding:
        app[flowapi.METRICS_KEY].register(Padding(padding))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def fetch(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return bytes(r.read())


def series_of(body: bytes) -> int:
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def query(prom: int, expression: str) -> dict[str, float]:
    url = f"http://127.0.0.1:{prom}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        result = json.loads(r.read())["data"]["result"]
    return {row["metric"]["job"]: float(row["value"][1]) for row in result}


def exposition_cpu_ms(port_padding: int, reps: int = 7) -> tuple[float, float]:
    """Median CPU of the agent's exposition (``flow_metrics.text_exposition``, as GET /metrics) of its registry
    (padded with ``port_padding`` series), without HTTP or Prometheus: (steady: nothing counted since the last
    scrape, after every count key changed since the last scrape)."""
    hub = flowapi.FlowHub("bench")
    fill(hub)
    registry = flowapi.metrics_registry(hub)
    if port_padding:
        registry.register(Padding(port_padding))
    flow_metrics.text_exposition(registry.collect())  # the first scrape works out each count key's series
    steady, changed = [], []
    for _ in range(reps):
        c0 = time.process_time()
        flow_metrics.text_exposition(registry.collect())
        steady.append((time.process_time() - c0) * 1000)
        fill_counts(hub)
        c0 = time.process_time()
        flow_metrics.text_exposition(registry.collect())
        changed.append((time.process_time() - c0) * 1000)
    return statistics.median(steady), statistics.median(changed)


def range_values(prom: int, expression: str) -> list[tuple[float, float]]:
    """(timestamp, value) of every sample of the agent's ``expression`` (a range selector) now."""
    url = f"http://127.0.0.1:{prom}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        result = json.loads(r.read())["data"]["result"]
    return [(float(t), float(v)) for row in result if row["metric"].get("job") == "agent" for t, v in row["values"]]


def cpu_ms(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (its threads included), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


class Scraped(NamedTuple):
    durations: list[float]
    """Prometheus's ``scrape_duration_seconds`` of each scrape in the window, in ms."""
    samples: float
    up: float
    handler_ms: list[float]
    """The agent's handler CPU of each scrape in the window."""
    prometheus_ms: float
    """Prometheus's CPU over the window per scrape (its parsing and storing, and its own housekeeping)."""
    body: bytes


async def scraped(padding: int, scrapes: int) -> Scraped:
    """One target (the agent's app, padded with ``padding`` series) scraped by its own Prometheus every second.
    Nothing is asked of Prometheus during the ``scrapes`` seconds measured; its samples are read afterwards."""
    handler_ms: list[float] = []
    runner, port = await serve(padding, handler_ms)
    try:
        body = await asyncio.to_thread(fetch, port)
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
            prom = free_port()
            Path(tmp, "prometheus.yml").write_text(json.dumps({
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [{"job_name": "agent", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
            proc = subprocess.Popen(["/usr/bin/prometheus", f"--config.file={tmp}/prometheus.yml",
                                     f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{prom}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 60
                while len(handler_ms) < 3 and time.monotonic() < deadline:  # the bench's fetch, two scrapes
                    await asyncio.sleep(0.5)  # the server runs on this loop: let it answer
                first, t0, c0 = len(handler_ms), time.time(), cpu_ms(proc.pid)
                await asyncio.sleep(scrapes + 0.5)
                last, t1, c1 = len(handler_ms), time.time(), cpu_ms(proc.pid)
                window = f"[{int(t1 - t0) + 2}s]"
                try:
                    durations = [v * 1000 for t, v in await asyncio.to_thread(
                        range_values, prom, "scrape_duration_seconds" + window) if t0 <= t <= t1]
                    samples = (await asyncio.to_thread(query, prom, "scrape_samples_scraped")).get("agent", 0)
                    up = (await asyncio.to_thread(query, prom, "up")).get("agent", 0)
                except OSError:
                    durations, samples, up = [], 0.0, 0.0
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        return Scraped(durations, samples, up, handler_ms[first:last], (c1 - c0) / max(last - first, 1), body)
    finally:
        await runner.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=10000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--publish-only", action="store_true")
    args = parser.parse_args()
    print(f"FlowHub.publish: {publish_us_per_event(4096 if args.smoke else 20480):.2f} us CPU per event (median of 7); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.publish_only:
        return
    if args.smoke:
        args.series, args.scrapes = 6000, 3
    padding = 0
    for label in ("agent at its most series", f"agent padded to --series {args.series}"):
        used = padding
        run = await scraped(used, args.scrapes)
        body, durations, handler_ms = run.body, run.durations, run.handler_ms
        padding = max(0, args.series - series_of(body))
        load = os.getloadavg()[0]
        steady, changed = exposition_cpu_ms(used)
        if not durations:
            print(f"{label}: Prometheus recorded no scrape (up={run.up:.0f})")
            continue
        print(f"{label}: {series_of(body)} series, {len(body)} bytes; Prometheus scrape_duration_seconds over "
              f"{len(durations)} scrapes: median {statistics.median(durations):.1f} ms, max {max(durations):.1f} ms; "
              f"scrape_samples_scraped {run.samples:.0f}, up={run.up:.0f}; handler CPU per scrape median "
              f"{statistics.median(handler_ms or [0]):.1f} ms, max {max(handler_ms or [0]):.1f} ms; Prometheus CPU "
              f"{run.prometheus_ms:.1f} ms per scrape; exposition alone {steady:.1f} ms CPU steady, {changed:.1f} ms "
              f"after every count key changed (medians of 7); load average {load:.1f} on {os.cpu_count()} CPUs; "
              f"target < 50 ms")


if __name__ == "__main__":
    asyncio.run(main())
