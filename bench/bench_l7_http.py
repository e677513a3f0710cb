"""HTTP through the node's Envoy (ingress L7 policy) vs direct (L3/L4 policy only), same pods.

Run as root from the repository root:  .venv/bin/python bench/bench_l7_http.py [--requests 2000]
[--rounds 2] [--clients 4] [--lab DIR] [--smoke]

It brings up its own real-node lab (two kubelet nodes, Ciliary installed by its Helm chart, as ``ciliary
lab up``; under ``.lab-benchl7-<pid>``, prefix ``l<pid>``) and takes it down afterwards, also on failure;
``--lab DIR`` runs it on a real-node lab already up instead. The server pod on node-1 runs a keep-alive HTTP/1.1 server on port 8080 answering 1 KiB bodies (headers
and body in one write); client pods on node-1 (same node) and node-2 (cross node). For each policy
(``l4``: fromEndpoints client on 8080/TCP; ``l7``: the same with ``http: [{method: GET, path: /.*}]``)
and each client, Python clients in the client pod's namespace measure: ``keepalive`` (one connection,
sequential requests), ``new`` (a new connection per request) and ``ka-xN`` (``--clients`` keep-alive
connections in parallel, one process each: the moderate-load row). Requests/s, p50 and p99 latency.

The policies alternate (``l4 l7 l7 l4 l4 l7 ...``; one of ``--rounds`` is one l4 and one l7 pass) and
each pass first checks that the path is the one it claims (node-1's Envoy counts upstream requests
under l7 and none under l4). Figures are the median over rounds, with each round's l7/l4 ratio; never
asserted (machines are shared and noisy; the client is Python, so absolute numbers include its own
cost). With each figure the bench prints the load average and, per request, the CPU time and the
run-queue wait (``/proc/<pid>/task/*/schedstat``) of the clients, the server, node-1's Envoy and
node-1's agent (which turns Envoy's access log into flows; Envoy is the agent container's child): on a
loaded machine the run-queue wait
says how much of a latency is scheduling rather than the proxy's own work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT / "bench")]

import real_node_lab  # noqa: E402
from ciliary.lab import labimage  # noqa: E402
from ciliary.lab.lab import Lab  # noqa: E402
from ciliary.nodeagent.envoy_config import CLUSTER_NAME  # noqa: E402

NS = "bench-l7"
#: the chart agent's Envoy run directory (values ``agent.stateDir``, then the agent's ``envoy``)
ENVOY_DIR = "/var/lib/ciliary/agent/envoy"
PODS = f"""
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NS}, labels: {{app: server}}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: lab}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: near, namespace: {NS}, labels: {{app: client}}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: lab}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: far, namespace: {NS}, labels: {{app: client}}}}
spec: {{nodeName: node-2, containers: [{{name: c, image: lab}}]}}
"""
RULES = {"l4": "", "l7": "\n      rules: {http: [{method: GET, path: /.*}]}"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]{rules}
"""

SERVER = r"""
import asyncio
BODY = b"x" * 1024
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n"
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD + BODY)
            await writer.drain()
            if b"connection: close" in head.lower():
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", 8080, backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"""

CLIENT = r"""
import http.client, json, sys, time
ip, n, mode, start_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def sched():
    return [int(x) for x in open("/proc/self/schedstat").read().split()[:2]]
lat = []
conn = None
while time.monotonic() < start_at:
    time.sleep(0.001)
s0 = sched()
t0 = time.monotonic()
for i in range(n):
    s = time.perf_counter()
    if conn is None or mode == "new":
        conn = http.client.HTTPConnection(ip, 8080, timeout=5)
    conn.request("GET", "/bench", headers={} if mode != "new" else {"Connection": "close"})
    r = conn.getresponse(); body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, len(body))
    if mode == "new":
        conn.close(); conn = None
    lat.append(round((time.perf_counter() - s) * 1e6))
t1 = time.monotonic()
s1 = sched()
print(json.dumps({"t0": t0, "t1": t1, "lat": lat, "cpu_ns": s1[0] - s0[0], "wait_ns": s1[1] - s0[1]}))
"""
MODES = ("keepalive", "new", "ka-x{clients}")
WHO = ("client", "server", "envoy", "agent")


def in_pod(lab: Lab, pod: str, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
    netns, _ = lab.pod_target(pod, NS)
    return subprocess.Popen(["nsenter", f"--net={netns}", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)  # type: ignore[call-overload]


def schedstat(pid: int) -> tuple[int, int]:
    """CPU time and run-queue wait (ns) of the threads ``pid`` has now (0, 0 once it is gone)."""
    cpu = wait = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            fields = task.read_text().split()
        except OSError:
            continue
        cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
    return cpu, wait


def measure(lab: Lab, pod: str, ip: str, n: int, mode: str, watched: dict[str, int]) -> dict[str, float]:
    """Requests/s, p50/p99 (ms), the load average, and per request the CPU time and run-queue wait (us)
    of the client processes and of each ``watched`` process."""
    clients = int(mode.split("x")[1]) if mode.startswith("ka-x") else 1
    start_at = time.monotonic() + 0.5  # the clients start together, after their interpreters are up
    before = {name: schedstat(pid) for name, pid in watched.items()}
    load = os.getloadavg()[0]
    procs = [in_pod(lab, pod, [sys.executable, "-c", CLIENT, ip, str(max(1, n // clients)),
                               "new" if mode == "new" else "keepalive", str(start_at)]) for _ in range(clients)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"client in {pod} failed: {err[-2000:]}")
        outs.append(json.loads(out))
    after = {name: schedstat(pid) for name, pid in watched.items()}
    lat = sorted(x for o in outs for x in o["lat"])
    total = len(lat)
    result = {"rps": total / (max(o["t1"] for o in outs) - min(o["t0"] for o in outs)),
              "p50_ms": lat[total // 2] / 1e3, "p99_ms": lat[int(total * 0.99)] / 1e3, "load": load,
              "client_cpu": sum(o["cpu_ns"] for o in outs) / total / 1e3,
              "client_wait": sum(o["wait_ns"] for o in outs) / total / 1e3}
    for name in watched:
        result[f"{name}_cpu"] = (after[name][0] - before[name][0]) / total / 1e3
        result[f"{name}_wait"] = (after[name][1] - before[name][1]) / total / 1e3
    return result


def wait_enforced(lab: Lab) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=5s", "-n", NS, "cnp/bench", check=False)
        if done.returncode == 0:
            return
    raise RuntimeError("policy not enforced")


def proxied_requests(admin_socket: str) -> int:
    """Requests node-1's Envoy has sent to pods so far (its ingress cluster's upstream_rq_total)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(admin_socket)
        sock.sendall(b"GET /stats?filter=upstream_rq_total HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith(f"cluster.{CLUSTER_NAME}.upstream_rq_total:"):
            return int(line.split(":")[1])
    return 0


def wait_path(lab: Lab, ip: str, policy: str, admin_socket: str) -> None:
    """Wait (at most 60 s) until a request from each client takes the path ``policy`` names."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok = True
        for pod in ("near", "far"):
            before = proxied_requests(admin_socket)
            measure(lab, pod, ip, 1, "keepalive", {})
            ok = ok and (proxied_requests(admin_socket) > before) == (policy == "l7")
        if ok:
            return
        time.sleep(1)
    raise RuntimeError(f"requests do not take the {policy} path")


def envoy_pid(agent: int) -> int:
    """The pid of the Envoy the agent ``agent`` runs (a descendant of the agent's process)."""
    for pid in real_node_lab.descendants(agent)[1:]:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "envoy":
                return pid
    raise RuntimeError(f"the agent (pid {agent}) runs no Envoy")


def median(values: list[float]) -> float:
    ordered, half = sorted(values), len(values) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def report(results: dict[tuple[int, str, str, str], dict[str, float]], rounds: int, modes: list[str]) -> None:
    def cells(pol: str, pod: str, mode: str) -> list[dict[str, float]]:
        return [results[r, pol, pod, mode] for r in range(rounds)]

    print(f"{'client':<6} {'mode':<9} {'l4 req/s':>9} {'l7 req/s':>9} {'ratio':>6} {'l4 p50':>7} {'l7 p50':>7} "
          f"{'l4 p99':>7} {'l7 p99':>7} {'added p99 ms':>12}  ratio per round")
    for pod in ("near", "far"):
        for mode in modes:
            a, b = ({k: median([c[k] for c in cells(pol, pod, mode)]) for k in ("rps", "p50_ms", "p99_ms")}
                    for pol in ("l4", "l7"))
            per_round = " ".join(f"{y['rps'] / x['rps']:.2f}"
                                 for x, y in zip(cells("l4", pod, mode), cells("l7", pod, mode), strict=True))
            print(f"{pod:<6} {mode:<9} {a['rps']:>9.0f} {b['rps']:>9.0f} {b['rps'] / a['rps']:>6.2f} "
                  f"{a['p50_ms']:>7.3f} {b['p50_ms']:>7.3f} {a['p99_ms']:>7.3f} {b['p99_ms']:>7.3f} "
                  f"{b['p99_ms'] - a['p99_ms']:>12.3f}  {per_round}")
    print("\nper request (median over rounds): CPU us / run-queue wait us of the client processes, the server, "
          "node-1's Envoy and node-1's agent; load average (1 min) when each round's measurement started")
    print(f"{'client':<6} {'mode':<9} {'policy':<6} " + " ".join(f"{who:>11}" for who in WHO) + "  load")
    for pod in ("near", "far"):
        for mode in modes:
            for pol in ("l4", "l7"):
                got = cells(pol, pod, mode)
                cols = " ".join(f"{median([c[who + '_cpu'] for c in got]):>5.0f}/"
                                f"{median([c[who + '_wait'] for c in got]):<5.0f}" for who in WHO)
                loads = ",".join(f"{c['load']:.1f}" for c in got)
                print(f"{pod:<6} {mode:<9} {pol:<6} {cols}  {loads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="l4/l7 pairs, alternating (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="parallel keep-alive connections of the ka-xN row")
    parser.add_argument("--lab", metavar="DIR", help="run on this real-node lab, already up (its state directory)")
    parser.add_argument("--smoke", action="store_true", help="30 requests, 1 round, 2 clients (checks the bench runs)")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds, args.clients = 30, 1, 2
    modes = [m.format(clients=args.clients) for m in MODES]
    with real_node_lab.real_lab("benchl7", "l", args.lab) as lab:
        try:
            run(lab, args.requests, args.rounds, modes)
        finally:
            if args.lab:  # an own lab goes as a whole
                real_node_lab.delete_namespace(lab, NS)


def run(lab: Lab, requests: int, rounds: int, modes: list[str]) -> None:
    real_node_lab.ensure_ready(lab)
    server: subprocess.Popen[str] | None = None
    try:
        lab.kubectl("create", "namespace", NS)
        lab.kubectl("apply", "-f", "-", input=labimage.manifest_for_real_nodes(PODS))
        for pod in ("server", "near", "far"):
            lab.kubectl("wait", "--for=condition=Ready", "--timeout=180s", "-n", NS, f"pod/{pod}")
        ip = json.loads(lab.kubectl("get", "pod", "server", "-n", NS, "-o", "json").stdout)["status"]["podIP"]
        server = in_pod(lab, "server", [sys.executable, "-c", SERVER])
        agent = real_node_lab.agent_pid(lab, "node-1")
        # the agent's Envoy directory is in node-1's mount namespace: reached through the agent's root
        envoy_dir = Path(f"/proc/{agent}/root{ENVOY_DIR}")
        admin_socket = json.loads((envoy_dir / "bootstrap.json").read_text())["admin"]["address"]["pipe"]["path"]
        admin_socket = f"/proc/{agent}/root{admin_socket}"
        watched = {"server": server.pid, "envoy": envoy_pid(agent), "agent": agent}
        time.sleep(1)
        results: dict[tuple[int, str, str, str], dict[str, float]] = {}
        for rnd in range(rounds):
            for policy in ("l4", "l7") if rnd % 2 == 0 else ("l7", "l4"):
                lab.kubectl("apply", "-f", "-", input=POLICY.format(ns=NS, rules=RULES[policy]))
                wait_enforced(lab)
                wait_path(lab, ip, policy, admin_socket)
                for pod in ("near", "far"):
                    for mode in modes:
                        measure(lab, pod, ip, max(50, requests // 10), mode, {})  # warm-up
                        results[rnd, policy, pod, mode] = measure(lab, pod, ip, requests, mode, watched)
        report(results, rounds, modes)
    finally:
        if server is not None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
