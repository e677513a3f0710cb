"""Datapath benchmark: TCP request/response rate under policy, vs no program and vs iptables.

Run as root:  PYTHONPATH=operator:nodeagent:e2e .venv/bin/python bench/bench_datapath.py [--n 20000] [--reps 9]

Topology: tests/integration/datapath/dp_topology.py, twice side by side (two pods
and a node netns each): one never gets a program (the no-program and iptables
peers), the other runs Ciliary's. One persistent TCP connection per run, N 64-byte
ping-pongs (like netperf TCP_RR); runs alternate between the two topologies
(ABBA order) and each ratio is the median of --reps per-pair ratios, so machine
noise hits both sides of a pair alike. Two program-less topologies measured this
way differ by up to ~10% per pair on this shared 2-core machine: read the
medians, not single pairs. Policies have K entries on the server's ingress; the matching one is
the last in the iptables chain (worst case for a linear scan), and every forward
packet is evaluated (no ESTABLISHED shortcut), as Ciliary does. Ratios are taken
against numbers measured in the same run. Also: policy-change-to-enforced latency
(Datapath.apply of a change = the map writes) p50/p99 for 1 and 1,000 entries.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "nodeagent"), str(ROOT / "tests/integration/datapath")]

from dp_topology import Client, Topology  # noqa: E402

from ciliary.nodeagent import planning  # noqa: E402
from ciliary.nodeagent.datapath import compiling, engine  # noqa: E402
from ciliary.operator import intents  # noqa: E402
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict  # noqa: E402

PORT = 8080
SIZES = (10, 1000, 10000)


def rr_rate(client: Client, ip: str, n: int, reps: int) -> float:
    rates = []
    for _ in range(reps):
        out = client.call(op="rr", ip=ip, port=PORT, n=n, size=64, timeout=2.0, wait=120)
        if out["result"] != "ok":
            raise RuntimeError(f"round trips failed: {out}")
        rates.append(n / float(str(out["seconds"])))
    return statistics.median(rates)


def entries(k: int) -> tuple[PolicyEntry, ...]:
    others = tuple(PolicyEntry(identity=5000 + i, protocol=Protocol.TCP, port_low=PORT, verdict=Verdict.ALLOW)
                   for i in range(k - 1))
    return others + (PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=PORT, verdict=Verdict.ALLOW),)


def intent(topo: Topology, node: str, revision: int, policy: tuple[PolicyEntry, ...]) -> intents.NodeIntent:
    a, b = topo.pods
    return intents.NodeIntent(
        node=node, revision=revision,
        endpoints=(intents.EndpointIntent(namespace="b", pod="a", ipv4=a.ip, identity=1001),
                   intents.EndpointIntent(namespace="b", pod="b", ipv4=b.ip, identity=1002,
                                          ingress=DirectionPolicy(enforced=True, entries=policy))),
        ipcache=(intents.IpcacheEntry(cidr=f"{a.ip}/32", identity=1001),
                 intents.IpcacheEntry(cidr=f"{b.ip}/32", identity=1002)))


def iptables(topo: Topology, k: int | None) -> None:
    a, b = topo.pods
    lines = ["*filter", ":INPUT ACCEPT [0:0]", f":FORWARD {'DROP' if k else 'ACCEPT'} [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if k:
        lines.append(f"-A FORWARD -s {b.ip}/32 -p tcp --sport {PORT} -j ACCEPT")  # replies
        for i in range(k - 1):  # one rule per entry; other sources first, the match last
            lines.append(f"-A FORWARD -s 10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}/32 -d {b.ip}/32 "
                         f"-p tcp --dport {PORT} -j ACCEPT")
        lines.append(f"-A FORWARD -s {a.ip}/32 -d {b.ip}/32 -p tcp --dport {PORT} -j ACCEPT")
    lines.append("COMMIT\n")
    subprocess.run(["ip", "netns", "exec", topo.node_ns, "iptables-restore"], input="\n".join(lines),
                   text=True, check=True, timeout=120)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000, help="round trips per run")
    parser.add_argument("--reps", type=int, default=9, help="interleaved pairs of runs per figure")
    args = parser.parse_args()

    # two identical topologies side by side: "plain" never has a program (no program, then
    # iptables), "cy" has Ciliary's; runs alternate between them, so every ratio compares
    # two runs taken a fraction of a second apart on this shared machine
    plain, cyt = Topology(pods=2), Topology(pods=2)
    dp: engine.Datapath | None = None
    try:
        clients = {}
        for topo in (plain, cyt):
            topo.up()
            a, b = topo.pods
            topo.serve(b, [PORT], [])
            clients[topo.tag] = (topo.client(a), b.ip)
        version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()

        def pair(i: int) -> tuple[float, float]:
            """(ciliary, peer) rates of two back-to-back runs; the order alternates (ABBA)."""
            if i % 2:
                theirs = rr_rate(*clients[plain.tag], args.n, 1)
                return rr_rate(*clients[cyt.tag], args.n, 1), theirs
            mine = rr_rate(*clients[cyt.tag], args.n, 1)
            return mine, rr_rate(*clients[plain.tag], args.n, 1)

        node = f"bench-{cyt.tag}"
        dp = engine.Datapath(node, netns=cyt.node_ns)
        dp.start()
        veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in cyt.pods}
        compiles = compiling.compile_count()
        rows = []
        revision = 0
        for k in SIZES:
            revision += 1
            dp.apply(intent(cyt, node, revision, entries(k)), veths)
            iptables(plain, None)
            vs_none = [pair(i) for i in range(args.reps)]
            iptables(plain, k)
            vs_ipt = [pair(i) for i in range(args.reps)]
            iptables(plain, None)
            rows.append((k, statistics.median(t for _, t in vs_none), statistics.median(t for _, t in vs_ipt),
                         statistics.median(m for m, _ in vs_none + vs_ipt),
                         statistics.median(m / t for m, t in vs_none), statistics.median(m / t for m, t in vs_ipt)))

        latencies: dict[int, list[float]] = {}
        for k, reps in ((1, 50), (1000, 20)):
            base_entries = entries(1)
            extra = tuple(PolicyEntry(identity=90000 + i, protocol=Protocol.TCP, port_low=9000 + i % 100,
                                      verdict=Verdict.ALLOW) for i in range(k))
            revision += 1
            dp.apply(intent(cyt, node, revision, base_entries), veths)
            samples = []
            for r in range(reps):
                revision += 1
                policy = base_entries + extra if r % 2 == 0 else base_entries
                began = time.perf_counter()
                dp.apply(intent(cyt, node, revision, policy), veths)
                samples.append((time.perf_counter() - began) * 1000)
            latencies[k] = samples
        assert compiling.compile_count() == compiles

        print(f"# TCP request/response, {args.n} x 64 B round trips per run; {args.reps} interleaved pairs per "
              f"ratio (median of per-pair ratios); {version}")
        print(f"{'entries':>8} {'no program':>12} {'iptables':>10} {'ciliary':>10} {'cy/none':>8} {'cy/ipt':>8}")
        for k, none, ipt, cy, r_none, r_ipt in rows:
            print(f"{k:>8} {none:>10.0f}/s {ipt:>8.0f}/s {cy:>8.0f}/s {r_none:>8.2f} {r_ipt:>8.2f}")
        print("# policy change -> enforced (Datapath.apply = map writes, no compile)")
        for k, samples in latencies.items():
            print(f"{k:>6} entries: p50 {pct(samples, 0.5):.2f} ms  p99 {pct(samples, 0.99):.2f} ms  "
                  f"({len(samples)} changes)")
        print(f"# clang runs during policy changes: {compiling.compile_count() - compiles}")
    finally:
        if dp is not None:
            dp.teardown()
        for topo in (plain, cyt):
            topo.down()


if __name__ == "__main__":
    main()
