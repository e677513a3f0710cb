"""HTTP through the node's Envoy (ingress L7 policy) vs direct (L3/L4 policy only), same pods.

Run as root from the repository root:  .venv/bin/python bench/bench_l7_http.py [--requests 2000] [--smoke]

A fresh lab (own prefix and state directory, taken down afterwards): server pod on node-1 runs a
keep-alive HTTP/1.1 server on port 8080 answering 1 KiB bodies; client pods on node-1 (same node)
and node-2 (cross node). For each policy (``l4``: fromEndpoints client on 8080/TCP; ``l7``: the
same with ``http: [{method: GET, path: /.*}]``) and each client, one Python client in the client
pod's namespace measures sequential requests: keep-alive (one connection) and new connection per
request; requests/s, p50 and p99 latency. Figures are printed with the l7/l4 ratios, never asserted
(machines are shared and noisy; the client is Python, so absolute numbers include its own cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from ciliary.lab.lab import Lab  # noqa: E402
from ciliary.lab.layout import Binaries, LabLayout  # noqa: E402

NS = "bench-l7"
PODS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
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
ip, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lat = []
conn = None
t0 = time.perf_counter()
for i in range(n):
    s = time.perf_counter()
    if conn is None or mode == "new":
        conn = http.client.HTTPConnection(ip, 8080, timeout=5)
    conn.request("GET", "/bench", headers={} if mode == "keepalive" else {"Connection": "close"})
    r = conn.getresponse(); body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, len(body))
    if mode == "new":
        conn.close(); conn = None
    lat.append(time.perf_counter() - s)
total = time.perf_counter() - t0
lat.sort()
print(json.dumps({"rps": n / total, "p50_ms": lat[n // 2] * 1e3, "p99_ms": lat[int(n * 0.99)] * 1e3}))
"""


def in_pod(lab: Lab, pod: str, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
    netns, _ = lab.pod_target(pod, NS)
    return subprocess.Popen(["nsenter", f"--net={netns}", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)  # type: ignore[call-overload]


def measure(lab: Lab, pod: str, ip: str, n: int, mode: str) -> dict[str, float]:
    proc = in_pod(lab, pod, [sys.executable, "-c", CLIENT, ip, str(n), mode])
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"client in {pod} failed: {err[-2000:]}")
    return dict(json.loads(out))


def wait_enforced(lab: Lab) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=5s", "-n", NS, "cnp/bench", check=False)
        if done.returncode == 0:
            return
    raise RuntimeError("policy not enforced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="30 requests per measurement (checks the bench runs)")
    args = parser.parse_args()
    if args.smoke:
        args.requests = 30
    layout = LabLayout(state_dir=ROOT / ".lab-bench-l7", prefix="cybl7")
    lab = Lab(layout, Binaries.discover())
    lab.down(log=False)
    server: subprocess.Popen[str] | None = None
    try:
        lab.up(2, log=False)
        lab.kubectl("apply", "-f", "-", input=PODS)
        for pod in ("server", "near", "far"):
            lab.kubectl("wait", "--for=condition=Ready", "--timeout=120s", "-n", NS, f"pod/{pod}")
        ip = json.loads(lab.kubectl("get", "pod", "server", "-n", NS, "-o", "json").stdout)["status"]["podIP"]
        server = in_pod(lab, "server", [sys.executable, "-c", SERVER])
        time.sleep(1)
        results: dict[tuple[str, str, str], dict[str, float]] = {}
        for policy in ("l4", "l7"):
            lab.kubectl("apply", "-f", "-", input=POLICY.format(ns=NS, rules=RULES[policy]))
            wait_enforced(lab)
            time.sleep(2)
            for pod in ("near", "far"):
                for mode in ("keepalive", "new"):
                    measure(lab, pod, ip, max(50, args.requests // 10), mode)  # warm-up
                    results[policy, pod, mode] = measure(lab, pod, ip, args.requests, mode)
        print(f"{'client':<6} {'mode':<9} {'l4 req/s':>9} {'l7 req/s':>9} {'ratio':>6} "
              f"{'l4 p50':>7} {'l7 p50':>7} {'l4 p99':>7} {'l7 p99':>7} {'added p99 ms':>12}")
        for pod in ("near", "far"):
            for mode in ("keepalive", "new"):
                a, b = results["l4", pod, mode], results["l7", pod, mode]
                print(f"{pod:<6} {mode:<9} {a['rps']:>9.0f} {b['rps']:>9.0f} {b['rps'] / a['rps']:>6.2f} "
                      f"{a['p50_ms']:>7.3f} {b['p50_ms']:>7.3f} {a['p99_ms']:>7.3f} {b['p99_ms']:>7.3f} "
                      f"{b['p99_ms'] - a['p99_ms']:>12.3f}")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        lab.down(log=False)


if __name__ == "__main__":
    main()
