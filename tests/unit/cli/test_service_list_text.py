"""``ciliary service list``'s text rendering: frontends, empty backend sets, problems, unreadable nodes."""

from __future__ import annotations

from ciliary.cli import service_commands


def test_rendering_names_refusal_drop_affinity_dsr_and_problems() -> None:
    doc = {"node": "node-1", "error": "", "frontends": [
        {"id": 1, "address": "10.96.0.10", "port": 80, "protocol": "TCP", "service": "ns/web", "kind": "ClusterIP",
         "flags": ["affinity"], "affinity_timeout": 60,
         "backends": [{"slot": 1, "id": 3, "address": "10.244.1.5", "port": 8080},
                      {"slot": 2, "id": 4, "address": "10.244.2.5", "port": 8080}]},
        {"id": 2, "address": "10.96.0.11", "port": 80, "protocol": "UDP", "service": "ns/empty", "kind": "ClusterIP",
         "flags": [], "affinity_timeout": 0, "backends": []},
        {"id": 5, "address": "10.96.0.12", "port": 80, "protocol": "TCP", "service": "ns/local", "kind": "ClusterIP",
         "flags": ["no-local-backends"], "affinity_timeout": 0, "backends": []},
        {"id": 6, "address": "192.0.2.11", "port": 30080, "protocol": "TCP", "service": "ns/web", "kind": "NodePort",
         "flags": ["external", "dsr"], "affinity_timeout": 0,
         "backends": [{"slot": 1, "id": 4, "address": "10.244.2.5", "port": 8080}]}],
        "problems": [{"service": "ns/bad", "reason": "NodePortOutOfRange", "message": "port http: nodePort 80 ..."}]}
    text = "\n".join(service_commands.render_text("node-1", doc))
    assert "10.96.0.10:80/TCP" in text and "1) 10.244.1.5:8080, 2) 10.244.2.5:8080" in text
    assert "[affinity 60s]" in text
    assert [line for line in text.splitlines() if "[DSR from outside]" in line] == [
        "     6  192.0.2.11:30080/TCP     ns/web NodePort              1) 10.244.2.5:8080  [DSR from outside]"]
    assert "10.96.0.11:80/UDP" in text and "(none: refused)" in text
    assert "(none: dropped, no local backend)" in text
    assert "error: ns/bad: NodePortOutOfRange" in text
    assert service_commands.render_text("node-2", "no agent is registered") == [
        "node-2: cannot read the load balancer: no agent is registered"]


def test_rendering_shows_health_check_ports_and_why_one_is_not_served() -> None:
    doc = {"node": "node-1", "error": "", "frontends": [], "problems": [], "health_checks": [
        {"service": "ns/web", "port": 32000, "local_endpoints": 2, "serving": True, "status": 200, "error": ""},
        {"service": "ns/db", "port": 32001, "local_endpoints": 0, "serving": False, "status": None,
         "error": "listening socket 0.0.0.0:32001 in netns n1: Address already in use"}]}
    text = "\n".join(service_commands.render_text("node-1", doc))
    assert "health-check :32000  ns/web  local endpoints 2, answers 200" in text
    assert "health-check :32001  ns/db  local endpoints 0, not served: listening socket" in text


def test_rendering_shows_the_external_local_set_and_the_north_south_devices() -> None:
    doc = {"node": "node-2", "error": "", "problems": [], "frontends": [
        {"id": 7, "address": "192.0.2.12", "port": 30182, "protocol": "TCP", "service": "ns/one", "kind": "NodePort",
         "flags": ["external", "external-local"], "affinity_timeout": 0,
         "backends": [{"slot": 1, "id": 3, "address": "10.244.1.5", "port": 8080}],
         "external_backends": [], "external_flags": ["no-local-backends", "external"]}],
        "north_south": {"devices": [{"name": "eth0", "ifindex": 2, "snat_address": "192.0.2.12"}],
                        "counters": {"new": 3, "reply": 9, "no-backend": 0}, "nat_entries": 6, "error": ""}}
    text = "\n".join(service_commands.render_text("node-2", doc))
    assert "1) 10.244.1.5:8080" in text  # socket clients on the node keep the whole set
    assert "from outside (Local):" in text and "(none: dropped, no local backend)" in text
    assert "north-south on eth0 (SNAT 192.0.2.12); packets: new 3, reply 9" in text
    pending = {**doc, "north_south": {"devices": [], "counters": {}, "nat_entries": 0, "error": "not attached yet"}}
    assert "  north-south: not attached yet" in service_commands.render_text("node-2", pending)


def test_rendering_shows_load_balancer_source_ranges() -> None:
    def row(ident: int, ranges: list[str]) -> dict[str, object]:
        return {"id": ident, "address": "203.0.113.1", "port": 80 + ident, "protocol": "TCP", "service": "ns/lb",
                "kind": "LoadBalancer", "flags": ["external", "source-ranges"], "affinity_timeout": 0,
                "backends": [], "source_ranges": ranges}

    doc = {"node": "node-1", "error": "", "problems": [], "frontends": [row(1, ["192.0.2.0/24"]), row(2, [])]}
    text = "\n".join(service_commands.render_text("node-1", doc))
    assert "outside clients only from: 192.0.2.0/24" in text
    assert "none in IPv4: every outside client dropped" in text
