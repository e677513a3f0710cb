"""A policy-selected pod stays enforced on every packet while the other endpoints of its node churn.

Evidence for the wrong allow of cyclonus's live run (README "Known defects"): a pod like cyclonus's
x/a (ingress only TCP 80 from one identity and the host; egress TCP 80 to some identities and port 53)
is probed with UDP on 80 and 81 from an unenforced client (z/c) in a bounded loop, from several
client processes at once, while the engine applies a stream of intents in which the other
endpoints of the node come and go (their veths stay), get new identities (a new pod) and ep_ids
freed by others, switch policies (some allow exactly that UDP port from z/c's identity, which x/a
would borrow if its ep_id or endpoint record were ever mixed up with theirs), and the revision is
bumped (every endpoint's entry rewritten). Other pods talk UDP to each other so that conntrack
fills and the purge of gone endpoints runs. Not one probe may be answered; TCP 80 from x/c must
stay allowed. ``CILIARY_CHURN_SECONDS`` lengthens the run (default 15 s).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
from dp_topology import Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import engine
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("CILIARY_CHURN_SECONDS", "15"))
ID_HOST, ID_XA, ID_ZC, ID_XC, ID_YA = 1, 3001, 3002, 3003, 3004
CHURN = 5
PROBERS = 3


def allow(identity: int, protocol: Protocol, low: int = 0) -> PolicyEntry:
    return PolicyEntry(identity=identity, protocol=protocol, port_low=low, verdict=Verdict.ALLOW)


XA_INGRESS = DirectionPolicy(enforced=True, entries=(allow(ID_XC, Protocol.TCP, 80), allow(ID_HOST, Protocol.ANY)))
XA_EGRESS = DirectionPolicy(enforced=True, entries=(
    allow(ID_YA, Protocol.TCP, 80), allow(0, Protocol.UDP, 53), allow(0, Protocol.TCP, 53)))
CHURN_POLICIES = (
    DirectionPolicy(),
    DirectionPolicy(enforced=True),
    DirectionPolicy(enforced=True, entries=(allow(0, Protocol.ANY),)),
    DirectionPolicy(enforced=True, entries=(allow(ID_ZC, Protocol.UDP, 80), allow(ID_ZC, Protocol.UDP, 81))),
    DirectionPolicy(enforced=True, entries=(allow(ID_ZC, Protocol.ANY),)),
)


class Churn:
    def __init__(self, topo: Topology, dp: engine.Datapath, seed: int) -> None:
        self.topo, self.dp = topo, dp
        self.xa, self.zc, self.xc, *self.others = topo.pods
        self.rng = random.Random(seed)
        self.revision = 1
        self.identity = {p.ip: 4000 + i for i, p in enumerate(self.others)}
        self.applies = 0

    def intent(self, present: list[str], policies: dict[str, DirectionPolicy]) -> intents.NodeIntent:
        eps = [intents.EndpointIntent(namespace="x", pod="a", ipv4=self.xa.ip, identity=ID_XA,
                                      ingress=XA_INGRESS, egress=XA_EGRESS),
               intents.EndpointIntent(namespace="z", pod="c", ipv4=self.zc.ip, identity=ID_ZC),
               intents.EndpointIntent(namespace="x", pod="c", ipv4=self.xc.ip, identity=ID_XC)]
        eps += [intents.EndpointIntent(namespace="e2e", pod=p.name, ipv4=p.ip, identity=self.identity[p.ip],
                                       ingress=policies[p.ip]) for p in self.others if p.ip in present]
        ipcache = [intents.IpcacheEntry(cidr=f"{ip}/32", identity=i)
                   for ip, i in ((self.xa.ip, ID_XA), (self.zc.ip, ID_ZC), (self.xc.ip, ID_XC))]
        ipcache += [intents.IpcacheEntry(cidr=f"{p.ip}/32", identity=self.identity[p.ip])
                    for p in self.others if p.ip in present]
        if self.rng.random() < 0.3:
            ipcache.append(intents.IpcacheEntry(cidr=f"{self.zc.ip.rsplit('.', 1)[0]}.0/24", identity=16777217))
        return intents.NodeIntent(node=self.dp.node, revision=self.revision, endpoints=tuple(eps),
                                  ipcache=tuple(ipcache))

    def step(self) -> None:
        rng = self.rng
        if rng.random() < 0.4:
            self.revision += 1
        present = [p.ip for p in self.others if rng.random() < 0.6]
        for ip in self.identity:
            if rng.random() < 0.2:
                self.identity[ip] += 100  # a new pod at that address: another identity
        policies = {p.ip: rng.choice(CHURN_POLICIES) for p in self.others}
        veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex)
                 for p in (self.xa, self.zc, self.xc, *self.others) if p.ip in present or rng.random() < 0.5
                 or p in (self.xa, self.zc, self.xc)}
        self.dp.apply(self.intent(present, policies), veths)
        self.applies += 1


@pytest.fixture(scope="module")
def churn_topology(tool) -> Iterator[Topology]:
    tool("ip")
    topo = Topology(pods=3 + CHURN)
    try:
        topo.up()
        yield topo
    finally:
        topo.down()


def test_selected_pod_never_answers_udp_while_others_churn(churn_topology: Topology) -> None:
    topo = churn_topology
    xa, zc, xc, *others = topo.pods
    topo.serve(xa, [80], [80, 81])
    for p in others:
        topo.serve(p, [], [80])
    dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns)
    try:
        dp.start()
        churn = Churn(topo, dp, seed=13)
        churn.step()
        assert topo.client(xc).tcp(xa.ip, 80) == "ok"
        assert topo.client(zc).udp(xa.ip, 80, timeout=0.5) == "timeout"

        stop = threading.Event()
        answered: list[tuple[float, int]] = []
        probes = [0]
        lock = threading.Lock()

        def probe(n: int) -> None:
            client = topo.client(zc)
            port = 80 + n % 2
            while not stop.is_set():
                result = client.udp(xa.ip, port, timeout=0.3)  # a late answer must still count
                with lock:
                    probes[0] += 1
                    if result == "ok":
                        answered.append((time.monotonic(), port))

        def chatter(n: int) -> None:  # conntrack entries for the purge of gone endpoints
            client = topo.client(others[n])
            while not stop.is_set():
                client.udp(others[(n + 1) % len(others)].ip, 80, timeout=0.05)

        threads = [threading.Thread(target=probe, args=(i,), daemon=True) for i in range(PROBERS)]
        threads += [threading.Thread(target=chatter, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + SECONDS
        try:
            while time.monotonic() < deadline:
                churn.step()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
        print(f"churn: {churn.applies} applies, {probes[0]} UDP probes of x/a, {len(answered)} answered")
        assert probes[0] > 50 and churn.applies > 50
        assert answered == [], f"x/a answered {len(answered)} of {probes[0]} UDP probes during {churn.applies} applies"
        assert topo.client(xc).tcp(xa.ip, 80) == "ok"
    finally:
        dp.teardown()
