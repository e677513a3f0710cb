"""Datapath benchmark: TCP connection rate and request/response rate under policy, vs no program and iptables.

Run as root from the repository root:

    .venv/bin/python bench/bench_datapath.py [--sizes 10,1000,10000] [--reps 7] [--crr-n 3000] [--rr-n 20000]
    .venv/bin/python bench/bench_datapath.py --smoke      # tiny sizes: proves the bench still runs

Three identical throw-away topologies side by side (tests/integration/datapath/
dp_topology.py: a node netns, a client pod and a server pod on veths): ``none``
never gets a program or a firewall rule, ``ipt`` gets the iptables peer, ``cy``
gets Ciliary's tc programs with the server's ingress policy. Load comes from a
tiny C client/server (``bench/tcpload.c``, compiled with cc at start), timed by
the C client itself:

- CRR (like netperf TCP_CRR): per transaction a new TCP connection: connect,
  64-byte request, 64-byte response, close;
- RR (like TCP_RR): one connection, 64-byte round trips.

The iptables peer is the rule set as it is deployed: in the node's FORWARD chain
``-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT`` first, then one rule per
policy entry (source /32, destination, tcp, dport), the client's rule last (worst
case of the linear scan; on average a new connection scans half the chain), then
a final DROP for unmatched new connections. So with iptables only a connection's
first packet walks the chain; Ciliary looks every forward packet up in its policy
map (replies pass through its conntrack map).

Runs alternate between Ciliary and the peer (ABBA order) and each ratio is the
median of ``--reps`` per-pair ratios, so machine noise hits both sides of a pair
alike; absolute rates are medians too. One run per topology and test after
each size's rules are loaded is a warm-up and not counted. A loopback run (client and server in one
pod, no veth, no forwarding) shows how fast the generator itself can go: if it
is not well above the no-program rate, the generator is the bottleneck. Also:
policy change to enforced at map level (``Datapath.apply`` = the map writes) for
1 and 1,000 entries; the end-to-end figure is bench/bench_policy_change.py.
Targets at 10,000 entries: CRR >= 5x iptables and >= 0.9x no program.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "nodeagent"), str(ROOT / "tests/integration/datapath"),
                str(ROOT / "bench")]

from dp_topology import Topology  # noqa: E402

import loadgen  # noqa: E402
from ciliary.nodeagent import planning  # noqa: E402
from ciliary.nodeagent.datapath import compiling, engine  # noqa: E402
from ciliary.operator import intents  # noqa: E402
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict  # noqa: E402

PORT = 8080
MODES = ("crr", "rr")


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


def iptables_rules(topo: Topology, k: int) -> str:
    """The deployed shape: conntrack accept first, one rule per entry (the client's last), final drop."""
    a, b = topo.pods
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    for i in range(k - 1):  # other sources first, the match last
        lines.append(f"-A FORWARD -s 10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}/32 -d {b.ip}/32 "
                     f"-p tcp --dport {PORT} -j ACCEPT")
    lines.append(f"-A FORWARD -s {a.ip}/32 -d {b.ip}/32 -p tcp --dport {PORT} -j ACCEPT")
    lines.append("-A FORWARD -j DROP")
    lines.append("COMMIT\n")
    return "\n".join(lines)


def load_iptables(topo: Topology, k: int) -> None:
    subprocess.run(["ip", "netns", "exec", topo.node_ns, "iptables-restore"], input=iptables_rules(topo, k),
                   text=True, check=True, timeout=300)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def map_level_latency(dp: engine.Datapath, cyt: Topology, node: str, veths: Mapping[IPv4Address | str, planning.HostVeth],
                      revision: int, sizes: tuple[tuple[int, int], ...]) -> dict[int, list[float]]:
    latencies: dict[int, list[float]] = {}
    for k, reps in sizes:
        base = entries(1)
        extra = tuple(PolicyEntry(identity=90000 + i, protocol=Protocol.TCP, port_low=9000 + i % 100,
                                  verdict=Verdict.ALLOW) for i in range(k))
        revision += 1
        dp.apply(intent(cyt, node, revision, base), veths)
        samples = []
        for r in range(reps):
            revision += 1
            policy = base + extra if r % 2 == 0 else base
            began = time.perf_counter()
            dp.apply(intent(cyt, node, revision, policy), veths)
            samples.append((time.perf_counter() - began) * 1000)
        latencies[k] = samples
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="policy entries (comma separated)")
    parser.add_argument("--crr-n", type=int, default=3000, help="connections per CRR run")
    parser.add_argument("--rr-n", type=int, default=20000, help="round trips per RR run")
    parser.add_argument("--reps", type=int, default=7, help="alternating pairs of runs per ratio")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one pair: checks the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.crr_n, args.rr_n, args.reps = "10,100", 200, 500, 1
    sizes = [int(x) for x in args.sizes.split(",")]
    n_of = {"crr": args.crr_n, "rr": args.rr_n}

    work = Path(tempfile.mkdtemp(prefix="cy-bench-dp-"))
    topos = {name: Topology(pods=2) for name in ("none", "ipt", "cy")}
    servers: list[loadgen.Server] = []
    dp: engine.Datapath | None = None
    try:
        binary = loadgen.build(work)
        for topo in topos.values():
            topo.up()
            loadgen.tune_client_netns(topo.pods[0].netns)
            loadgen.tune_client_netns(topo.pods[1].netns)
            servers.append(loadgen.Server(binary, topo.pods[1].netns, PORT))
        version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()

        def rate(name: str, mode: str) -> float:
            topo = topos[name]
            return loadgen.run(binary, topo.pods[0].netns, mode, topo.pods[1].ip, PORT, n_of[mode])

        loopback = {mode: statistics.median(loadgen.run(binary, topos["none"].pods[1].netns, mode, "127.0.0.1",
                                                        PORT, n_of[mode]) for _ in range(max(3, args.reps // 2)))
                    for mode in MODES}

        def pairs(peer: str, mode: str) -> list[tuple[float, float]]:
            """(ciliary, peer) rates of back-to-back runs; the order alternates (ABBA)."""
            out = []
            for i in range(args.reps):
                first: Callable[[], float] = (lambda: rate(peer, mode)) if i % 2 else (lambda: rate("cy", mode))
                second: Callable[[], float] = (lambda: rate("cy", mode)) if i % 2 else (lambda: rate(peer, mode))
                x, y = first(), second()
                out.append((y, x) if i % 2 else (x, y))
            return out

        cyt = topos["cy"]
        node = f"bench-{cyt.tag}"
        dp = engine.Datapath(node, netns=cyt.node_ns)
        dp.start()
        veths: dict[IPv4Address | str, planning.HostVeth] = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in cyt.pods}
        compiles = compiling.compile_count()
        rows: list[dict[str, Any]] = []
        revision = 0
        for k in sizes:
            revision += 1
            dp.apply(intent(cyt, node, revision, entries(k)), veths)
            load_iptables(topos["ipt"], k)
            for name in topos:  # warm-up, not counted: fresh rules, maps and conntrack state settle
                for mode in MODES:
                    rate(name, mode)
            for mode in MODES:
                vs_none, vs_ipt = pairs("none", mode), pairs("ipt", mode)
                rows.append({"k": k, "mode": mode,
                             "none": statistics.median(t for _, t in vs_none),
                             "ipt": statistics.median(t for _, t in vs_ipt),
                             "cy": statistics.median(m for m, _ in vs_none + vs_ipt),
                             "cy/none": statistics.median(m / t for m, t in vs_none),
                             "cy/ipt": statistics.median(m / t for m, t in vs_ipt)})
                print(f"# {mode} at {k} entries: {rows[-1]}", flush=True)
        latencies = map_level_latency(dp, cyt, node, veths, revision,
                                      ((1, 4), (1000, 2)) if args.smoke else ((1, 50), (1000, 20)))
        clang_runs = compiling.compile_count() - compiles

        print(f"\n# 64 B transactions; CRR {args.crr_n} connections per run, RR {args.rr_n} round trips per run; "
              f"{args.reps} alternating pairs per ratio (median of per-pair ratios); {version}")
        print(f"# loopback (generator ceiling, no veth): CRR {loopback['crr']:.0f}/s, RR {loopback['rr']:.0f}/s")
        print(f"{'test':>4} {'entries':>8} {'no program':>12} {'iptables':>10} {'ciliary':>10} {'cy/none':>8} "
              f"{'cy/ipt':>8}")
        for r in rows:
            print(f"{r['mode']:>4} {r['k']:>8} {r['none']:>10.0f}/s {r['ipt']:>8.0f}/s {r['cy']:>8.0f}/s "
                  f"{r['cy/none']:>8.2f} {r['cy/ipt']:>8.2f}")
        target = [r for r in rows if r["mode"] == "crr" and r["k"] == 10000]
        for r in target:
            print(f"# target at 10,000 entries, CRR: >= 5x iptables: {'met' if r['cy/ipt'] >= 5 else 'NOT met'} "
                  f"({r['cy/ipt']:.2f}x); >= 0.9x no program: {'met' if r['cy/none'] >= 0.9 else 'NOT met'} "
                  f"({r['cy/none']:.2f}x)")
        print("# policy change -> enforced at map level (Datapath.apply = map writes, no compile)")
        for k, samples in latencies.items():
            print(f"{k:>6} entries: p50 {pct(samples, 0.5):.2f} ms  p99 {pct(samples, 0.99):.2f} ms  "
                  f"({len(samples)} changes)")
        print(f"# clang runs during policy changes: {clang_runs}")
        if clang_runs:
            raise SystemExit("a policy change compiled a program")
    finally:
        if dp is not None:
            dp.teardown()
        for server in servers:
            server.stop()
        for topo in topos.values():
            topo.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
