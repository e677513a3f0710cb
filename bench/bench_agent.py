"""Agent footprint and flow throughput: RSS with 100 endpoints, flow events/s consumed without loss.

Needs root. Starts its own etcd, a private node netns (dp_topology: 2 pods with real
traffic + 98 extra veth pairs inside the node netns), and a real ``ciliary-agent``
process pinning under its own bpffs dir; everything is removed at the end.

  PYTHONPATH=operator:nodeagent:e2e .venv/bin/python bench/bench_agent.py [--seconds 5] [--pps 0]

Figures printed: agent VmRSS/VmHWM after 100 endpoints are enforced (and whether
the compiler's libraries are mapped in the agent: they should not be); flow events
the agent consumed per second while pod a sends UDP datagrams that its egress
policy drops (one event per dropped packet), and the losses (kernel ring full,
reader, slow followers) from ``/v1/flows/stats``. ``--pps`` paces the sender (0: as fast
as one process can send).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pyroute2 import IPRoute

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration" / "datapath"))
_spec = importlib.util.spec_from_file_location("agent_it", REPO / "tests/integration/agent/test_agent_enforce.py")
assert _spec and _spec.loader
it = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(it)

from ciliary.cni import agent_client  # noqa: E402
from ciliary.operator import intents  # noqa: E402
from ciliary.operator.store import keyspace  # noqa: E402

SENDER = """
import socket, sys, time
ip, seconds, pps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, end, gap = 0, time.monotonic() + seconds, (1.0 / pps if pps else 0.0)
nxt = time.monotonic()
while time.monotonic() < end:
    s.sendto(b"x", (ip, 9999)); sent += 1
    if gap:
        nxt += gap
        d = nxt - time.monotonic()
        if d > 0: time.sleep(d)
print(sent)
"""


def vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


def stats(agent: object) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{agent.health}/v1/flows/stats", timeout=5) as r:  # type: ignore[attr-defined]
        return dict(json.loads(r.read()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pps", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cyt-bench-agent-"))
    etcd = it.Etcd()
    topo = it.Topology(pods=2)
    agent = None
    try:
        topo.up()
        extra = []
        with IPRoute(netns=topo.node_ns, flags=0) as ipr:
            for n in range(98):
                name = f"cyb{topo.tag}{n:02d}"[:15]
                ipr.link("add", ifname=name, kind="veth", peer=f"pb{topo.tag}{n:02d}"[:15])
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=idx, state="up")
                extra.append((name, idx, f"10.250.{n // 200}.{n % 200 + 10}"))
        agent = it.Agent(etcd, topo, workdir)
        agent.start()
        client = agent_client.AgentClient(str(agent.socket))
        agent.register()
        for n, (name, idx, ip) in enumerate(extra):
            client.add_endpoint({"containerId": f"ctr-x{n}", "podNamespace": "b", "podName": f"x{n}", "podUid": "",
                                 "netns": "/run/netns/none", "ifname": "eth0", "hostIfname": name,
                                 "hostIfindex": idx, "mac": "02:00:00:00:00:02", "ipv4": ip})
        a, b = topo.pods
        allow = intents.DirectionPolicy(enforced=True, entries=tuple(
            intents.PolicyEntry(identity=2000 + k, protocol=intents.Protocol.TCP, port_low=80 + k,
                                verdict=intents.Verdict.ALLOW) for k in range(10)))
        eps = [intents.EndpointIntent(namespace="b", pod="a", ipv4=a.ip, identity=1001,
                                      egress=intents.DirectionPolicy(enforced=True)),
               intents.EndpointIntent(namespace="b", pod="b", ipv4=b.ip, identity=1002, ingress=allow)]
        eps += [intents.EndpointIntent(namespace="b", pod=f"x{n}", ipv4=ip, identity=3000 + n, ingress=allow)
                for n, (_, _, ip) in enumerate(extra)]
        intent = intents.NodeIntent(node=agent.node, revision=1, endpoints=tuple(eps),
                                    ipcache=tuple(intents.IpcacheEntry(cidr=f"{e.ipv4}/32", identity=e.identity)
                                                  for e in eps))
        etcd.put(keyspace.node_intent_key(agent.node), intent.to_wire())
        it.wait_until(lambda: (e := agent.enforcement()) and e["applied_revision"] == 1, 60, "intent applied")
        time.sleep(1)
        assert agent.proc is not None
        mem = vm(agent.proc.pid)
        print(f"endpoints: {len(eps)} enforced; agent VmRSS {mem['VmRSS'] / 1024:.1f} MiB "
              f"(peak VmHWM {mem['VmHWM'] / 1024:.1f} MiB); target < 150 MB")
        mapped = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        compiler = sorted({lib for lib in ("libLLVM", "libclang", "libbcc") if lib in mapped})
        print(f"compiler libraries mapped in the agent: {', '.join(compiler) or 'none'} "
              f"(programs are compiled in a child process)")

        before = stats(agent)
        sender = subprocess.run(["ip", "netns", "exec", a.netns, sys.executable, "-c", SENDER, b.ip,
                                 str(args.seconds), str(args.pps)], capture_output=True, text=True,
                                timeout=args.seconds + 60)
        sent = int(sender.stdout.strip() or 0)
        time.sleep(1.0)
        after = stats(agent)
        seen = after["seen"] - before["seen"]
        lost = after["lost"] - before["lost"]
        print(f"flows: sender {sent} dropped datagrams in {args.seconds:.1f} s ({sent / args.seconds:.0f}/s); "
              f"agent consumed {seen} events ({seen / args.seconds:.0f}/s), lost {lost} "
              f"(kernel {after['lost_kernel'] - before['lost_kernel']}, reader "
              f"{after['lost_reader'] - before['lost_reader']}, followers "
              f"{after['lost_followers'] - before['lost_followers']})")
        mem = vm(agent.proc.pid)
        print(f"after the flow burst: VmRSS {mem['VmRSS'] / 1024:.1f} MiB (VmHWM {mem['VmHWM'] / 1024:.1f} MiB)")
    finally:
        if agent is not None:
            agent.kill()
            shutil.rmtree(agent.bpffs, ignore_errors=True)
        topo.down()
        etcd.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
