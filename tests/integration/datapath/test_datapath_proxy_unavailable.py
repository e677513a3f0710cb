"""Fail closed on the real kernel: an entry whose L7 rules need a proxy this node does not run drops.

Pod a's egress allows pod b on UDP 6053 with DNS rules, on TCP 7080 with HTTP rules and on TCP
7000 at L4; pod b's ingress allows a on TCP 9092 with Kafka rules and on TCP 7000 at L4. The
datapath has no proxy port at all (``--dns-proxy-port 0``, no egress HTTP or Kafka proxy): b
serves every port, so a packet passed as a plain L3/L4 allow would be answered. The L7 ports
time out, each drop is counted and reported as a ``PROXY_UNAVAILABLE`` flow event naming the
rule's cookie, while the L4 port answers. Everything lives in the private topology.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dp_topology import Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import engine, flows, maps
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

ID_A, ID_B = 1001, 1002
DNS_PORT, HTTP_PORT, KAFKA_PORT, L4_PORT = 6053, 7080, 9092, 7000
R = maps.Reason
RULE = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="t", name="l7", rule_index=0, section="egress[0]")


Lab = tuple[Topology, engine.Datapath, flows.FlowReader]


@pytest.fixture(scope="module")
def lab(topology: Topology) -> Iterator[Lab]:
    a, b = topology.pods[0], topology.pods[1]
    topology.serve(b, [HTTP_PORT, KAFKA_PORT, L4_PORT], [DNS_PORT])
    dp = engine.Datapath(f"cyt-{topology.tag}-np", netns=topology.node_ns)
    assert dp.proxy_ports == {}  # no proxy of any kind on this node

    def l7(peer: int, proto: Protocol, port: int, parser: str) -> PolicyEntry:
        return PolicyEntry(identity=peer, protocol=proto, port_low=port, verdict=Verdict.ALLOW, l7_redirect=True,
                           l7_parser=parser, rules=(RULE,))  # type: ignore[arg-type]

    plain = dict(protocol=Protocol.TCP, port_low=L4_PORT, verdict=Verdict.ALLOW)
    egress = DirectionPolicy(enforced=True, entries=(
        l7(ID_B, Protocol.UDP, DNS_PORT, "dns"), l7(ID_B, Protocol.TCP, HTTP_PORT, "http"),
        PolicyEntry(identity=ID_B, **plain),  # type: ignore[arg-type]
        PolicyEntry(identity=ID_B, protocol=Protocol.TCP, port_low=KAFKA_PORT, verdict=Verdict.ALLOW)))
    ingress = DirectionPolicy(enforced=True, entries=(
        l7(ID_A, Protocol.TCP, KAFKA_PORT, "kafka"), PolicyEntry(identity=ID_A, **plain)))  # type: ignore[arg-type]
    intent = intents.NodeIntent(
        node=dp.node, revision=1,
        endpoints=(intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A, egress=egress),
                   intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=ID_B, ingress=ingress)),
        ipcache=(intents.IpcacheEntry(cidr=f"{a.ip}/32", identity=ID_A),
                 intents.IpcacheEntry(cidr=f"{b.ip}/32", identity=ID_B)))
    try:
        dp.start()
        dp.apply(intent, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in (a, b)})
        yield topology, dp, dp.flows()
    finally:
        dp.teardown()


def _drops(dp: engine.Datapath, direction: str) -> int:
    return sum(n for (d, r), (n, _b) in dp.counters().items() if d == direction and r == R.DROP_PROXY_UNAVAILABLE)


def _events(reader: flows.FlowReader, dport: int) -> list[flows.FlowEvent]:
    got: list[flows.FlowEvent] = []
    for _ in range(30):
        got += [e for e in reader.poll(100) if e.reason is R.DROP_PROXY_UNAVAILABLE and e.dport == dport]
        if got:
            break
    return got


def test_the_l4_port_answers(lab: Lab) -> None:
    topology, _dp, _reader = lab
    a, b = topology.pods[0], topology.pods[1]
    assert topology.client(a).tcp(b.ip, L4_PORT, timeout=2.0) == "ok"


@pytest.mark.parametrize(("kind", "direction", "port"), [("dns", "egress", DNS_PORT), ("http", "egress", HTTP_PORT),
                                                        ("kafka", "ingress", KAFKA_PORT)])
def test_an_l7_port_without_its_proxy_is_dropped(lab: Lab, kind: str, direction: str, port: int) -> None:
    topology, dp, reader = lab
    a, b = topology.pods[0], topology.pods[1]
    reader.poll(0)
    before = _drops(dp, direction)
    client = topology.client(a)
    got = client.udp(b.ip, port, timeout=1.0) if kind == "dns" else client.tcp(b.ip, port, timeout=1.0)
    assert got != "ok", f"{kind} port {port} passed as a plain L3/L4 allow"
    assert Topology.wait_until(lambda: _drops(dp, direction) > before, 5)
    events = _events(reader, port)
    assert events, "no PROXY_UNAVAILABLE flow event"
    event = events[0]
    assert event.verdict == "dropped" and event.direction == direction
    assert event.cookie == planning.rule_cookie((RULE,))
