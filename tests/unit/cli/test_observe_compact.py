"""``ciliary observe``'s one-line form of a flow (``observe_commands.compact``)."""

from __future__ import annotations

from ciliary.cli import observe_commands

FLOW = {"time": "2026-12-07T19:36:26.575966120Z", "node": "node-1", "verdict": "FORWARDED", "direction": "egress",
        "protocol": "TCP", "tcp_flags": ["SYN"], "is_reply": False,
        "src": {"ip": "10.244.1.8", "port": 47254, "identity": 258, "namespace": "default", "pod": "xwing"},
        "dst": {"ip": "10.244.1.9", "port": 80, "identity": 257, "namespace": "default", "pod": "deathstar"}}


def test_a_flow_through_a_service_names_it_after_the_backend() -> None:
    through = {**FLOW, "service": "default/deathstar-svc", "frontend": "10.96.12.192:8080"}
    line = observe_commands.compact(through, color=False)
    assert ("node-1: default/xwing:47254 (ID:258) -> default/deathstar:80 (ID:257) via default/deathstar-svc "
            "10.96.12.192:8080 TCP [SYN] egress FORWARDED") in line, line
    gone = observe_commands.compact({**through, "service": ""}, color=False)  # no Service has the frontend now
    assert "(ID:257) via frontend 10.96.12.192:8080 TCP" in gone, gone
    plain = observe_commands.compact(FLOW, color=False)
    assert "via" not in plain and "(ID:257) TCP [SYN] egress FORWARDED" in plain, plain
