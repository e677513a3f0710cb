"""The agent's flow metrics (flow_metrics, GET /metrics): Hubble's and Cilium's names, bounded labels,
counts that match what was published, and an exposition `promtool check metrics` accepts."""

from __future__ import annotations

import subprocess
from typing import Any

import prometheus_client
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from test_hubble_convert import INTENT, event

from ciliary.nodeagent import flowapi
from ciliary.nodeagent.datapath import maps


def samples(registry: prometheus_client.CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = prometheus_client.generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counts_by_hubble_and_cilium_names() -> None:
    hub = flowapi.FlowHub("n1", capacity=4)
    hub.set_intent(INTENT)
    hub.publish([event() for _ in range(3)] + [event(reason=maps.Reason.DROP_POLICY_DENY, protocol=17)]
                + [event("forwarded", maps.Reason.OK_POLICY, flags=0x12) for _ in range(5)]
                + [event("forwarded", maps.Reason.OK_POLICY, direction="egress", protocol=1)])
    hub.lost_followers = 2
    got = samples(flowapi.metrics_registry(hub))
    assert got["hubble_flows_processed_total", (("protocol", "TCP"), ("subtype", ""), ("type", "Drop"),
                                                ("verdict", "DROPPED"))] == 3
    assert got["hubble_flows_processed_total", (("protocol", "TCP"), ("subtype", "to-endpoint"), ("type", "Trace"),
                                                ("verdict", "FORWARDED"))] == 5
    assert got["hubble_flows_processed_total", (("protocol", "ICMPv4"), ("subtype", "from-endpoint"),
                                                ("type", "Trace"), ("verdict", "FORWARDED"))] == 1
    assert got["hubble_drop_total", (("protocol", "TCP"), ("reason", "POLICY_DENIED"))] == 3
    assert got["hubble_drop_total", (("protocol", "UDP"), ("reason", "POLICY_DENY"))] == 1
    assert got["cilium_drop_count_total", (("direction", "INGRESS"), ("reason", "POLICY_DENIED"))] == 3
    assert got["cilium_forward_count_total", (("direction", "EGRESS"),)] == 1
    assert got["hubble_tcp_flags_total", (("family", "IPv4"), ("flag", "SYN"))] == 3 + 5
    assert got["hubble_tcp_flags_total", (("family", "IPv4"), ("flag", "ACK"))] == 5
    assert got["hubble_lost_events_total", (("source", "observer_events_queue"),)] == 2
    assert got["hubble_flow_ring_size", ()] == 4 and got["hubble_flow_ring_capacity", ()] == 4
    # bounded: more traffic of the same kinds adds no series
    before = len(got)
    hub.publish([event(sport=p) for p in range(1000, 2000)])
    assert len(samples(flowapi.metrics_registry(hub))) == before


async def test_metrics_route_passes_promtool(tool: Any) -> None:
    promtool = str(tool("promtool"))
    hub = flowapi.FlowHub("n1")
    hub.set_intent(INTENT)
    hub.publish([event(), event("forwarded", maps.Reason.OK_POLICY)])
    app = web.Application()
    flowapi.add_routes(hub)(app)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/metrics")
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert "hubble_flows_processed_total" in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
