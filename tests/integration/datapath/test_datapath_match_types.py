"""The policy match type in the loaded programs' flow events: which kind of entry decided.

Two pods (a 1001, b 1002) on one node; b's ingress gets one policy per case and a hand-built TCP SYN
from a runs through b's ingress hook (BPF_PROG_TEST_RUN, a fresh source port each time so no
conntrack entry answers for it). The event at b's ingress must carry Hubble's number for the entry
that decided (``CY_MATCH_*``, ``hubble_convert.MATCH_TYPES``): the peer's identity and a port (L3-L4),
the identity alone (L3-Only), the identity and a protocol with any port (L3-Proto), a port for any
peer (L4-Only), a protocol for any peer (Proto-Only), anything (all); a deny entry's kind with the
drop; none for a default-deny drop. Where several entries cover the packet, the kind is that of the
one the datapath probes first (the peer's identity before any peer, within it the packet's protocol
before any), as the policy.h lookup order says.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from dp_packets import TC_ACT_OK, TC_ACT_SHOT, TCP, Runner, frame
from dp_topology import Topology

from ciliary.nodeagent import hubble_convert, lookup_model, planning, rendering
from ciliary.nodeagent.datapath import engine, flows
from ciliary.nodeagent.planning import MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

ID_A, ID_B = 1001, 1002
DPORT = 8080
SPORTS = itertools.count(41000)


def allow(identity: int, protocol: Protocol, port: int = 0, verdict: Verdict = Verdict.ALLOW) -> PolicyEntry:
    return PolicyEntry(identity=identity, protocol=protocol, port_low=port, verdict=verdict)


CASES = {
    "l3-l4": ((allow(ID_A, Protocol.TCP, DPORT),), TC_ACT_OK, 2),
    "l3-only": ((allow(ID_A, Protocol.ANY),), TC_ACT_OK, 1),
    "l3-proto": ((allow(ID_A, Protocol.TCP),), TC_ACT_OK, 5),
    "l4-only": ((allow(0, Protocol.TCP, DPORT),), TC_ACT_OK, 3),
    "proto-only": ((allow(0, Protocol.TCP),), TC_ACT_OK, 6),
    "all": ((allow(0, Protocol.ANY),), TC_ACT_OK, 4),
    "a port for any protocol of the peer": ((allow(ID_A, Protocol.ANY, DPORT),), TC_ACT_OK, 2),
    # the peer's identity is probed before any peer: its entry decides, whatever the other's kind
    "l3-only beside l4-only": ((allow(0, Protocol.TCP, DPORT), allow(ID_A, Protocol.ANY)), TC_ACT_OK, 1),
    # within one identity the packet's protocol comes first, and the LPM hit is the longest port prefix
    "l3-l4 beside l3-proto": ((allow(ID_A, Protocol.TCP), allow(ID_A, Protocol.TCP, DPORT)), TC_ACT_OK, 2),
    "l3-proto beside l3-only": ((allow(ID_A, Protocol.ANY), allow(ID_A, Protocol.TCP)), TC_ACT_OK, 5),
    "deny of the peer": ((allow(0, Protocol.ANY), allow(ID_A, Protocol.ANY, verdict=Verdict.DENY)), TC_ACT_SHOT, 1),
    "deny of a port": ((allow(ID_A, Protocol.ANY), allow(0, Protocol.TCP, DPORT, Verdict.DENY)), TC_ACT_SHOT, 3),
    "default deny": ((allow(ID_A, Protocol.UDP, DPORT),), TC_ACT_SHOT, 0),
}


class Env:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo, self.dp = topo, dp
        self.a, self.b = (str(p.ip) for p in topo.pods[:2])
        self.runner = Runner(dp)
        self.reader = dp.flows()
        self.revision = 0

    def apply(self, entries: tuple[PolicyEntry, ...]) -> None:
        self.revision += 1
        a, b = self.topo.pods[:2]
        eps = (intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),
               intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=ID_B,
                                      ingress=DirectionPolicy(enforced=True, entries=entries)))
        intent = intents.NodeIntent(node=self.dp.node, revision=self.revision, endpoints=eps)
        self.dp.apply(intent, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in self.topo.pods[:2]})

    def syn_to_b(self) -> tuple[int, list[flows.FlowEvent]]:
        """A new connection's SYN from a through b's ingress hook: the verdict and b's ingress events of it."""
        self.reader.drain()
        sport = next(SPORTS)
        verdict = self.runner.run("to_pod", frame(self.a, self.b, TCP, sport, DPORT, tcp_flags=0x02))
        got: list[flows.FlowEvent] = []
        for _ in range(5):
            got += self.reader.poll(50)
        return verdict, [e for e in got if e.direction == "ingress" and e.sport == sport]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    topo = Topology(pods=2)
    dp: engine.Datapath | None = None
    the_env: Env | None = None
    try:
        topo.up()
        dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns,
                             context=rendering.RenderContext(pin_dir=f"/sys/fs/bpf/ciliary/cyt-{topo.tag}"))
        dp.start()
        the_env = Env(topo, dp)
        yield the_env
    finally:
        if the_env is not None:
            the_env.runner.close()
        if dp is not None:
            dp.teardown()
        topo.down()


def modelled(entries: tuple[PolicyEntry, ...]) -> lookup_model.LookupResult:
    """``lookup_model``'s answer for the SYN over the map contents ``planning`` writes for b's ingress."""
    policy = DirectionPolicy(enforced=True, entries=entries)
    allow, deny = planning.direction_maps(1, MapDirection.INGRESS, policy)
    flags = planning.enforced_flag(MapDirection.INGRESS) | (planning.deny_flag(MapDirection.INGRESS) if deny else 0)
    return lookup_model.simulate_lookup(allow, deny, flags=flags, ep_id=1, direction=MapDirection.INGRESS,
                                        identity=ID_A, protocol=int(Protocol.TCP), port=DPORT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_event_names_the_kind_of_entry_that_decided(env: Env, case: str) -> None:
    entries, verdict, match = CASES[case]
    env.apply(entries)
    got, events = env.syn_to_b()
    assert got == verdict
    assert len(events) == 1, events
    assert events[0].match_type == match, (case, hubble_convert.MATCH_TYPES.get(events[0].match_type))
    assert events[0].verdict == ("forwarded" if verdict == TC_ACT_OK else "dropped")
    # the Python model of the lookup says the same
    model = modelled(entries)
    assert (model.allowed, model.match_type) == (verdict == TC_ACT_OK, match), model


def test_an_unenforced_endpoint_reports_no_match(env: Env) -> None:
    env.apply(())
    a, b = env.topo.pods[:2]
    eps = (intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),
           intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=ID_B))
    env.revision += 1
    env.dp.apply(intents.NodeIntent(node=env.dp.node, revision=env.revision, endpoints=eps),
                 {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in env.topo.pods[:2]})
    got, events = env.syn_to_b()
    assert got == TC_ACT_OK and [e.match_type for e in events] == [0]
