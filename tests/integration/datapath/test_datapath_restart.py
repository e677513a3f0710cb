"""Pinned state survives a SIGKILLed loader; a new process adopts the pins and reconciles."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dp_topology import Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import compiling, engine
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def _intent(topo: Topology, node: str, ports: tuple[int, ...]) -> intents.NodeIntent:
    a, b = topo.pods[:2]
    entries = tuple(PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=p, verdict=Verdict.ALLOW)
                    for p in ports)
    return intents.NodeIntent(
        node=node, revision=len(ports),
        endpoints=(intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=1001),
                   intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=1002,
                                          ingress=DirectionPolicy(enforced=True, entries=entries))),
        ipcache=(intents.IpcacheEntry(cidr=f"{a.ip}/32", identity=1001),
                 intents.IpcacheEntry(cidr=f"{b.ip}/32", identity=1002)),
    )


@pytest.fixture
def restart_topology() -> Iterator[Topology]:
    topo = Topology(pods=2)
    try:
        topo.up()
        yield topo
    finally:
        topo.down()


def test_enforcement_survives_kill_and_is_adopted(restart_topology: Topology, tmp_path: Path) -> None:
    topo = restart_topology
    a, b = topo.pods
    node = f"cyt-{topo.tag}-r"
    topo.serve(b, [8080, 8081], [])
    client = topo.client(a)
    veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in topo.pods}
    (tmp_path / "intent.json").write_bytes(_intent(topo, node, (8080,)).to_wire())
    (tmp_path / "veths.json").write_text(json.dumps({ip: [v.ifname, v.ifindex] for ip, v in veths.items()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("operator", "nodeagent", "e2e"))}
    loader = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("dp_loader.py")), node, topo.node_ns,
         str(tmp_path / "intent.json"), str(tmp_path / "veths.json")],
        stdout=subprocess.PIPE, text=True, env=env)
    dp: engine.Datapath | None = None
    try:
        assert loader.stdout is not None
        ready, _, _ = select.select([loader.stdout], [], [], 60)
        assert ready and loader.stdout.readline().startswith("READY")
        assert client.tcp(b.ip, 8080) == "ok"
        assert client.tcp(b.ip, 8081) == "timeout"

        loader.kill()  # SIGKILL: no cleanup code runs
        loader.wait(timeout=10)
        assert client.tcp(b.ip, 8080) == "ok"
        assert client.tcp(b.ip, 8081) == "timeout"

        compiles = compiling.compile_count()
        dp = engine.Datapath(node, netns=topo.node_ns)
        observed = dp.start()  # adopts the pinned programs of the same hash: compiles nothing
        assert compiling.compile_count() == compiles
        assert set(observed.programs) == {"from_pod", "to_pod"}
        assert {x.sha256 for x in observed.attachments} == set(dp.program_hashes.values())
        assert len(observed.policy) == 1
        result = dp.apply(_intent(topo, node, (8080, 8081)), veths)
        # one policy entry, then the revision stamp of each of the two endpoints (written last)
        assert result.attached == () and result.compiled == () and result.map_writes == 1 + 2
        assert compiling.compile_count() == compiles
        assert client.tcp(b.ip, 8081) == "ok"
        reader = dp.flows()  # the pinned ring buffer still reaches the adopted programs' events
        assert client.tcp(b.ip, 8080) == "ok"
        events = reader.poll(200)
        assert any(e.dport == 8080 and e.verdict == "forwarded" for e in events)
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.wait(timeout=10)
        if dp is not None:
            dp.teardown()
        else:
            engine.Datapath(node, netns=topo.node_ns).teardown()
    assert not (Path("/sys/fs/bpf/ciliary") / node).exists()
