"""The agent's flow metrics (flow_metrics, GET /metrics): Hubble's and Cilium's names, bounded labels,
counts that match what was published, and an exposition `promtool check metrics` accepts."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address
from itertools import product
from typing import Any

import prometheus_client
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from test_hubble_convert import INTENT, event

from ciliary.nodeagent import dns_proxy, flow_metrics, flowapi, l7_flows
from ciliary.nodeagent.datapath import flows, maps


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


def _http(method: str, code: int, ms: int, direction: str = "ingress") -> l7_flows.L7Event:
    return l7_flows.L7Event(time=1.0, src=IPv4Address("10.0.1.5"), dst=IPv4Address("10.0.0.2"), sport=40000, dport=80,
                            verdict="dropped" if code == 403 else "forwarded",
                            reason="L7_DENIED" if code == 403 else "L7_ALLOWED", src_identity=301, dst_identity=300,
                            http=l7_flows.HttpInfo(method=method, url="/x", host="h", code=code, protocol="HTTP/1.1",
                                                   duration_ms=ms), rule=None, direction=direction)


def _dns(rcode: str, ips: int, verdict: str = "forwarded") -> dns_proxy.L7FlowEvent:
    return dns_proxy.L7FlowEvent(time=1.0, src=IPv4Address("10.0.1.5"), dst=IPv4Address("10.0.0.10"), sport=5353,
                                 dport=53, protocol=17, verdict=verdict,
                                 reason="DNS_ALLOWED" if verdict == "forwarded" else "DNS_REFUSED",
                                 src_identity=301, dst_identity=2, cookie=0,
                                 l7={"type": "dns", "query": "a.test", "qtype": "A", "rcode": rcode,
                                     "ips": [f"10.9.0.{i}" for i in range(ips)]})


def test_policy_verdicts_ports_http_and_dns() -> None:
    hub = flowapi.FlowHub("n1")
    hub.set_intent(INTENT)
    hub.publish([event() for _ in range(2)] + [event(reason=maps.Reason.DROP_POLICY_DENY)]
                + [event("forwarded", maps.Reason.OK_POLICY, dport=8080) for _ in range(4)]
                + [event("forwarded", maps.Reason.OK_REPLY, is_reply=True, dport=8080)]  # a reply: not a verdict
                + [event("forwarded", maps.Reason.OK_PROXY, dport=80)]
                + [event("forwarded", maps.Reason.OK_PROXY, dport=53, protocol=17, direction="egress")]
                + [_http("GET", 200, 3), _http("GET", 403, 0), _http("BREW", 200, 700, "egress")]
                + [_dns("NOERROR", 2), _dns("NOERROR", 12), _dns("REFUSED", 0, "dropped")]
                # a tracked connection's FIN report (medium aggregation): not a verdict on new traffic
                + [event("forwarded", maps.Reason.OK_POLICY, dport=8080, flags=0x11)]
                # a UDP exchange: its first packet is a verdict, the monitor interval's later report is not
                + [event("forwarded", maps.Reason.OK_POLICY, dport=5353, protocol=17, flags=0),
                   event("forwarded", maps.Reason.OK_POLICY, dport=5353, protocol=17, flags=0, established=True)])
    got = samples(flowapi.metrics_registry(hub))

    def verdicts(direction: str, match: str, action: str) -> float:
        return got.get(("hubble_policy_verdicts_total",
                        (("action", action), ("direction", direction), ("match", match))), 0)

    assert verdicts("ingress", "none", "dropped") == 2 and verdicts("ingress", "deny", "dropped") == 1
    assert verdicts("ingress", "allow", "forwarded") == 5  # 4 TCP SYNs, 1 UDP first packet (programs without types)
    assert got["hubble_port_distribution_total", (("port", "5353"), ("protocol", "UDP"))] == 1
    assert verdicts("ingress", "l7/http", "redirected") == 1 and verdicts("egress", "l7/dns", "redirected") == 1
    assert verdicts("ingress", "l7/http", "forwarded") == 1 and verdicts("ingress", "l7/http", "dropped") == 1
    assert verdicts("egress", "l7/dns", "forwarded") == 2 and verdicts("egress", "l7/dns", "dropped") == 1
    assert got["hubble_port_distribution_total", (("port", "8080"), ("protocol", "TCP"))] == 4  # the reply not
    assert got["hubble_port_distribution_total", (("port", "80"), ("protocol", "TCP"))] == 1
    assert got["hubble_http_requests_total", (("method", "GET"), ("protocol", "HTTP/1.1"), ("reporter", "server"))] == 2
    assert got["hubble_http_requests_total", (("method", "other"), ("protocol", "HTTP/1.1"), ("reporter", "client"))] == 1
    assert got["hubble_http_responses_total", (("method", "GET"), ("reporter", "server"), ("status", "403"))] == 1
    assert got["hubble_http_request_duration_seconds_bucket", (("le", "0.005"), ("method", "GET"),
                                                                ("reporter", "server"))] == 2
    assert got["hubble_http_request_duration_seconds_bucket", (("le", "0.5"), ("method", "other"),
                                                                ("reporter", "client"))] == 0
    assert got["hubble_http_request_duration_seconds_count", (("method", "other"), ("reporter", "client"))] == 1
    assert got["hubble_http_request_duration_seconds_sum", (("method", "other"), ("reporter", "client"))] == 0.7
    assert got["hubble_dns_queries_total", (("qtypes", "A"),)] == 3
    assert got["hubble_dns_responses_total", (("ips_returned", "10+"), ("qtypes", "A"), ("rcode", "NOERROR"))] == 1
    assert got["hubble_dns_responses_total", (("ips_returned", "0"), ("qtypes", "A"), ("rcode", "REFUSED"))] == 1


def test_port_series_are_capped() -> None:
    hub = flowapi.FlowHub("n1")
    hub.publish([event("forwarded", maps.Reason.OK_POLICY, dport=p) for p in range(1, 2001)])
    ports = {labels for name, labels in samples(flowapi.metrics_registry(hub))
             if name == "hubble_port_distribution_total"}
    assert len(ports) == flow_metrics.MAX_PORTS + 1
    got = samples(flowapi.metrics_registry(hub))
    assert got["hubble_port_distribution_total", (("port", "other"), ("protocol", "TCP"))] == 2000 - 256


def test_upstream_chosen_labels_fall_back_to_other() -> None:
    hub = flowapi.FlowHub("n1")
    odd = _dns("NOERROR", 1)
    odd = dns_proxy.L7FlowEvent(**{**odd.__dict__, "l7": {**odd.l7, "qtype": "TYPE65000", "rcode": "RCODE3000"}})
    hub.publish([odd, _http("GET", 999, 1), _http("GET", 418, 1)])
    got = samples(flowapi.metrics_registry(hub))
    assert got["hubble_dns_queries_total", (("qtypes", "other"),)] == 1
    assert got["hubble_dns_responses_total", (("ips_returned", "1"), ("qtypes", "other"), ("rcode", "other"))] == 1
    assert got["hubble_http_responses_total", (("method", "GET"), ("reporter", "server"), ("status", "other"))] == 1
    assert got["hubble_http_responses_total", (("method", "GET"), ("reporter", "server"), ("status", "418"))] == 1


def test_the_agents_exposition_says_what_prometheus_client_says() -> None:
    """GET /metrics writes the text itself (flow_metrics.text_exposition); parsed, it is sample for sample what
    prometheus_client's own exposition of the same registry gives, with a label value needing escapes too."""
    hub = flowapi.FlowHub("n1")
    hub.set_intent(INTENT)
    hub.publish([event(), event("forwarded", maps.Reason.OK_POLICY, flags=0x12), _http("GET", 200, 3),
                 _http("POST", 503, 1200, "egress"), _dns("NOERROR", 3)])
    registry = flowapi.metrics_registry(hub)

    class Odd(prometheus_client.registry.Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            family = prometheus_client.core.GaugeMetricFamily("odd", 'line\nwith "quotes" \\', labels=["v"])
            family.add_metric(['a "b"\nc\\d'], 0.25)
            yield family

    registry.register(Odd())
    ours = flow_metrics.text_exposition(registry.collect()).decode()
    theirs = prometheus_client.generate_latest(registry).decode()

    def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    assert parsed(ours) == parsed(theirs) and len(parsed(ours)) > 20


def _every_kind(flag_sets: Iterable[int]) -> list[flows.FlowEvent]:
    """One event of every verdict x reason x protocol x direction x family, TCP ones with each of ``flag_sets``."""
    out = []
    addresses: tuple[IPv4Address | IPv6Address, ...] = (IPv4Address("10.0.1.5"), IPv6Address("fd00::5"))
    for verdict, reason, proto, direction, src in product(
            ("forwarded", "dropped"), maps.Reason, (1, 6, 17, 58, 132), ("ingress", "egress"), addresses):
        for flags in (flag_sets if proto == 6 else (0,)):
            out.append(flows.FlowEvent(time=1.0, src=src, dst=src, sport=40000, dport=80, protocol=proto,
                                       tcp_flags=flags, verdict=verdict, reason=reason, direction=direction,
                                       is_reply=False, ep_id=1, src_identity=301, dst_identity=300, cookie=0,
                                       ifindex=7, length=60))
    return out


def _calls(scrape: Callable[[], object]) -> int:
    """Python and C function calls made by ``scrape()`` (a measure of its work that no machine load changes)."""
    calls = 0

    def profile(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        scrape()
    finally:
        sys.setprofile(None)
    return calls


def test_a_scrape_costs_the_series_not_the_count_keys() -> None:
    """Two hubs with the same series: one saw every TCP flag set (tens of thousands of count keys), the other
    only single flags (a twentieth of them). Once counted, a scrape of either does the same work: it reads
    per-series totals and never walks the count keys again; one new event costs the next scrape one fold."""
    many, few = flowapi.FlowHub("n1"), flowapi.FlowHub("n1")
    many.publish(_every_kind(range(256)))
    few.publish(_every_kind((0, *(1 << bit for bit in range(8)))))
    assert len(set(map(flow_metrics.count_key, _every_kind(range(256))))) > 20_000
    registries = flowapi.metrics_registry(many), flowapi.metrics_registry(few)
    for registry in registries:
        flow_metrics.text_exposition(registry.collect())  # folds what was counted
    assert samples(registries[0]).keys() == samples(registries[1]).keys()
    work = [_calls(functools.partial(flow_metrics.text_exposition, registry.collect())) for registry in registries]
    assert work[0] <= work[1] * 1.01, work  # walking the count keys again: 27 times the work
    before = many.counts.folded
    many.publish(_every_kind((0x02,))[:1])
    flow_metrics.text_exposition(registries[0].collect())
    assert many.counts.folded == before + 1


def test_folding_between_scrapes_gives_the_totals_of_one_fold() -> None:
    """Scraped after each of three batches, and by two registries of the same hub, the counts are those of one
    scrape after all of them; the agent's exposition of every flow series matches prometheus_client's."""
    batches = [_every_kind((0x02, 0x12)), _every_kind((0x11, 0x04, 0x02)), [event() for _ in range(5)]]
    stepwise, at_once = flowapi.FlowHub("n1"), flowapi.FlowHub("n1")
    registries = flowapi.metrics_registry(stepwise), flowapi.metrics_registry(stepwise)
    for i, batch in enumerate(batches):
        stepwise.publish(batch)
        flow_metrics.text_exposition(registries[i % 2].collect())
        at_once.publish(batch)
    want = samples(flowapi.metrics_registry(at_once))
    assert samples(registries[0]) == want == samples(registries[1]) and len(want) > 100
    ours = flow_metrics.text_exposition(registries[1].collect()).decode()
    assert {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(ours) for s in family.samples} == want


def test_policy_verdicts_name_the_kind_of_entry_that_decided() -> None:
    """The datapath's match type becomes Hubble's ``match`` label (l3-only, l3-l4, ...); none for default deny."""
    hub = flowapi.FlowHub("n1")
    hub.set_intent(INTENT)
    hub.publish([event("forwarded", maps.Reason.OK_POLICY, match=2) for _ in range(3)]
                + [event("forwarded", maps.Reason.OK_POLICY, match=m, direction="egress") for m in (1, 3, 4, 5, 6)]
                + [event(reason=maps.Reason.DROP_POLICY_DENY, match=1), event()])
    got = samples(flowapi.metrics_registry(hub))

    def verdicts(direction: str, match: str, action: str) -> float:
        return got.get(("hubble_policy_verdicts_total",
                        (("action", action), ("direction", direction), ("match", match))), 0)

    assert verdicts("ingress", "l3-l4", "forwarded") == 3
    for name in ("l3-only", "l4-only", "all", "l3-proto", "proto-only"):
        assert verdicts("egress", name, "forwarded") == 1, name
    assert verdicts("ingress", "l3-only", "dropped") == 1 and verdicts("ingress", "none", "dropped") == 1
    assert verdicts("ingress", "allow", "forwarded") == 0 and verdicts("ingress", "deny", "dropped") == 0
