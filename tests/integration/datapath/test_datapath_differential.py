"""Differential test: the loaded tc programs and ``evaluate_entries`` agree on every packet.

Hypothesis generates a NodeIntent for the three pods of the module's topology (each
direction enforced or not, allow and deny entries for several identities and "any",
TCP/UDP/ICMP/any protocol, single ports, port ranges (endPort) and "any port", ICMP
types, plus CIDR prefixes of random length in the ipcache), the engine writes it into the
real maps (``Datapath.apply``: the agent's own planning and map writes), and ~20 random
packets (source and destination among the pods, addresses inside the generated prefixes
and elsewhere; TCP, UDP or ICMP; interesting and random ports) each run through
``cy_from_pod`` and ``cy_to_pod`` with BPF_PROG_TEST_RUN. Each tc verdict must equal what
``evaluate_entries`` says for that direction (the peer's identity looked up as
``policy trace`` does: ``tracing.lookup_identity``; a side that is not a pod is not
evaluated and the program must pass the packet).

The skb of each run is on a device of the node's netns, as on a node: ``cy_to_pod`` on the
destination pod's host veth; ``cy_from_pod`` mostly on the source pod's veth (the source check
passes and policy decides), sometimes on another pod's veth (the packet claims an address that is
not the sending pod's: dropped SPOOFED_SOURCE, enforced or not), sometimes on loopback (a veth
the agent has not mapped: no pod to compare with, policy decides as before).

Conntrack is emptied after every program run, so each verdict is a policy decision and
never "reply of a tracked connection". The number of compared verdicts is printed at the
end of the session (conftest) and must be in the thousands.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from dp_packets import DIFFERENTIAL, ICMP, TC_ACT_OK, TC_ACT_SHOT, TCP, UDP, Runner, frame
from dp_topology import Topology
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import engine
from ciliary.operator import intents
from ciliary.operator.intents import Direction, DirectionPolicy, PolicyEntry, Protocol, Verdict
from ciliary.operator.policy import tracing

pytestmark = pytest.mark.integration

POLICIES = 1000
PACKETS = 20
IDENTITIES = (2, 6, 1001, 1002, 1003, 1004, 1005)
PORTS = (1, 22, 53, 79, 80, 81, 443, 1023, 1024, 5353, 8080, 8081, 32767, 32768, 65534, 65535)
ICMP_TYPES = (0, 3, 8, 11, 13)
PEER_SPACE = IPv4Network("10.0.0.0/8")
SENDERS = ("own", "own", "own", "pod", "loopback")
"""The device cy_from_pod sees a packet on: the source pod's veth (if the source is a pod), the drawn
pod's veth, or loopback (no ifindex)."""
Packet = tuple[str, str, int, int, str, str]


class Env:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo, self.dp = topo, dp
        self.runner = Runner(dp)
        self.veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in topo.pods}
        self.revision = 0


@pytest.fixture(scope="module")
def env(topology: Topology) -> Iterator[Env]:
    dp = engine.Datapath(f"cyt-{topology.tag}", netns=topology.node_ns)
    the_env: Env | None = None
    try:
        dp.start()
        the_env = Env(topology, dp)
        yield the_env
    finally:
        if the_env is not None:
            the_env.runner.close()
        dp.teardown()


# ---------------------------------------------------------------- strategies

ports = st.one_of(st.sampled_from(PORTS), st.integers(1, 65535))


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    identity = draw(st.sampled_from((0, *IDENTITIES)))
    protocol = draw(st.sampled_from((Protocol.ANY, Protocol.TCP, Protocol.UDP, Protocol.ICMP)))
    verdict = Verdict.DENY if draw(st.integers(0, 3)) == 0 else Verdict.ALLOW
    if protocol is Protocol.ICMP:
        icmp_type = draw(st.one_of(st.none(), st.sampled_from(ICMP_TYPES)))
        return PolicyEntry(identity=identity, protocol=protocol, icmp_type=icmp_type, verdict=verdict)
    kind = draw(st.sampled_from(("any", "port", "range")))
    if kind == "any":
        return PolicyEntry(identity=identity, protocol=protocol, verdict=verdict)
    low = draw(ports)
    high = 0 if kind == "port" else min(65535, low + draw(st.one_of(st.integers(0, 300), st.integers(0, 65535))))
    return PolicyEntry(identity=identity, protocol=protocol, port_low=low, port_high=high, verdict=verdict)


directions = st.builds(DirectionPolicy, enforced=st.integers(0, 4).map(bool),
                       entries=st.lists(entries(), max_size=6).map(tuple))


@st.composite
def prefixes(draw: st.DrawFn, pods: tuple[str, ...]) -> intents.IpcacheEntry:
    length = draw(st.sampled_from((0, 8, 12, 16, 20, 24, 26, 28, 30, 31, 32)))
    anchor = draw(st.one_of(st.sampled_from(pods), st.integers(int(PEER_SPACE[0]), int(PEER_SPACE[-1]))))
    network = IPv4Network(f"{IPv4Address(anchor)}/{length}", strict=False)
    if length == 32 and str(network.network_address) in pods:
        network = IPv4Network(f"{network.network_address + 1}/32")
    return intents.IpcacheEntry(cidr=str(network), identity=draw(st.sampled_from(IDENTITIES)))


@st.composite
def cases(draw: st.DrawFn, pods: tuple[str, ...]) -> tuple[intents.NodeIntent, list[Packet]]:
    identities = draw(st.lists(st.sampled_from(IDENTITIES[2:]), min_size=len(pods), max_size=len(pods)))
    endpoints = tuple(
        intents.EndpointIntent(namespace="t", pod=f"p{i}", ipv4=ip, identity=identities[i],
                               ingress=draw(directions), egress=draw(directions))
        for i, ip in enumerate(pods))
    cidrs: dict[str, intents.IpcacheEntry] = {}
    for entry in draw(st.lists(prefixes(pods), max_size=6)):
        cidrs.setdefault(entry.cidr, entry)
    own = {f"{e.ipv4}/32": intents.IpcacheEntry(cidr=f"{e.ipv4}/32", identity=e.identity) for e in endpoints}
    intent = intents.NodeIntent(node="diff", revision=0, endpoints=endpoints,
                                ipcache=tuple({**cidrs, **own}.values()))
    inside = [str(IPv4Network(e.cidr)[draw(st.integers(0, IPv4Network(e.cidr).num_addresses - 1))])
              for e in cidrs.values()]
    addresses = st.one_of(st.sampled_from(pods), st.sampled_from(inside or list(pods)),
                          st.integers(int(PEER_SPACE[0]), int(PEER_SPACE[-1])).map(lambda n: str(IPv4Address(n))))
    packet = st.tuples(addresses, addresses, st.sampled_from((TCP, UDP, ICMP)),
                       st.one_of(ports, st.sampled_from(ICMP_TYPES)), st.sampled_from(SENDERS), st.sampled_from(pods))
    return intent, draw(st.lists(packet, min_size=PACKETS, max_size=PACKETS))


# ---------------------------------------------------------------- the models


def expected(intent: intents.NodeIntent, hook: str, src: str, dst: str, protocol: int, port: int
             ) -> tuple[int, bool]:
    """The tc verdict ``evaluate_entries`` predicts for one hook (pass when its side is no pod), and
    whether the direction was enforced (a policy decision rather than a pass-through)."""
    pod, peer, direction = (src, dst, Direction.EGRESS) if hook == "from_pod" else (dst, src, Direction.INGRESS)
    endpoint = next((e for e in intent.endpoints if e.ipv4 == pod), None)
    if endpoint is None:
        return TC_ACT_OK, False
    local = next((e.identity for e in intent.endpoints if e.ipv4 == peer), None)
    identity = local if local is not None else tracing.lookup_identity(intent, IPv4Address(peer))
    policy = endpoint.direction(direction)
    decision = intents.evaluate_entries(policy, identity=identity, protocol=protocol, port=port)
    return (TC_ACT_OK if decision.allowed else TC_ACT_SHOT), policy.enforced


def devices(env: Env, src: str, dst: str, sender: str, other: str) -> tuple[int, int, str | None]:
    """The ifindex of each hook's run (0: loopback) and the pod whose veth cy_from_pod sees it on."""
    from_pod = {"own": src if src in env.veths else None, "pod": other, "loopback": None}[sender]
    to_pod = env.veths[dst].ifindex if dst in env.veths else 0
    return (env.veths[from_pod].ifindex if from_pod else 0), to_pod, from_pod


def packet_frame(src: str, dst: str, protocol: int, port: int) -> bytes:
    if protocol == ICMP:
        return frame(src, dst, ICMP, icmp_type=port % 256)
    return frame(src, dst, protocol, sport=40000 + port % 1000, dport=port)


@settings(max_examples=POLICIES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_programs_and_evaluate_entries_agree(env: Env, data: st.DataObject) -> None:
    began = time.monotonic()
    pods = tuple(p.ip for p in env.topo.pods)
    intent, packets = data.draw(cases(pods))
    env.revision += 1
    intent = intent.model_copy(update={"revision": env.revision, "node": env.dp.node})
    env.dp.apply(intent, env.veths)
    env.runner.clear_conntrack()
    for src, dst, protocol, port, sender, other in packets:
        port = port % 256 if protocol == ICMP else port
        packet = packet_frame(src, dst, protocol, port)
        from_ifindex, to_ifindex, sending_pod = devices(env, src, dst, sender, other)
        spoofed = sending_pod is not None and sending_pod != src
        for hook, ifindex in (("from_pod", from_ifindex), ("to_pod", to_ifindex)):
            if hook == "from_pod" and spoofed:
                want, enforced = TC_ACT_SHOT, False  # the veth's pod does not own the source address
            else:
                want, enforced = expected(intent, hook, src, dst, protocol, port)
            got = env.runner.run(hook, packet, ifindex)
            env.runner.clear_conntrack()
            assert got == want, (f"{hook} on ifindex {ifindex} (pod {sending_pod}): {src} -> {dst} proto "
                                 f"{protocol} port {port}: kernel {got}, expected {want}"
                                 f"\n{intent.model_dump_json(indent=1)}")
            DIFFERENTIAL["verdicts"] += 1
            DIFFERENTIAL["dropped"] += got == TC_ACT_SHOT
            DIFFERENTIAL["enforced"] += enforced
            DIFFERENTIAL["spoofed"] += hook == "from_pod" and spoofed
            DIFFERENTIAL["own_veth"] += hook == "from_pod" and sending_pod == src
        DIFFERENTIAL["packets"] += 1
    DIFFERENTIAL["policies"] += 1
    DIFFERENTIAL["seconds"] += time.monotonic() - began


def test_differential_ran_thousands_of_cases(env: Env, record_property: pytest.RecordProperty) -> None:
    """Runs after the property test (file order; alone, it runs it): the count is recorded and must
    not shrink silently."""
    if not DIFFERENTIAL["policies"]:
        test_programs_and_evaluate_entries_agree(env)
    for name, value in DIFFERENTIAL.items():
        record_property(f"differential_{name}", value)
    assert DIFFERENTIAL["policies"] >= POLICIES // 2, DIFFERENTIAL
    assert DIFFERENTIAL["verdicts"] >= 2000 and DIFFERENTIAL["enforced"] >= 1000, DIFFERENTIAL
    assert 0 < DIFFERENTIAL["dropped"] < DIFFERENTIAL["verdicts"], DIFFERENTIAL  # both verdicts exercised
    # cy_from_pod decided by policy on the sender's own veth (source check passed) in thousands of
    # runs, and spoofed sources were dropped, yet not every drop was a spoof drop
    assert DIFFERENTIAL["own_veth"] >= 1000, DIFFERENTIAL
    assert 0 < DIFFERENTIAL["spoofed"] < DIFFERENTIAL["dropped"] // 2, DIFFERENTIAL
