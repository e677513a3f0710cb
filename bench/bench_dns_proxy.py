"""DNS queries per second through the node's DNS proxy versus straight to the server.

Run as root from the repository root. It brings up its own real-node lab (two kubelet nodes, Ciliary
installed by its Helm chart, as ``ciliary lab up``; under ``.lab-benchdns-<pid>``, prefix ``d<pid>``) and
takes it down afterwards, also on failure; ``--lab DIR`` runs it on a real-node lab already up instead:

    .venv/bin/python bench/bench_dns_proxy.py [--seconds 5] [--window 1,32] [--lab .lab]
    .venv/bin/python bench/bench_dns_proxy.py --smoke     # one short run: proves the bench still runs

One pod on node-1 asks the world host's DNS server (192.0.2.53, ``ciliary.lab.worlddns``)
for ``api.world.test`` over UDP for ``--seconds`` seconds, with ``window`` queries
outstanding (1: one after the other; a query unanswered after 1 s counts as lost and is
replaced). First with no policy (direct), then with a CNP whose ``rules.dns`` sends the
pod's queries through the node's proxy and whose ``toFQDNs`` learns the answer (after
``kubectl wait --for=condition=Enforced``). Prints answers/s, p50/p99 latency and the
ratio proxy/direct per window, with the load average when each run started and the CPU time the
node's agent (which runs the proxy; its container's process) spent per answer
(``/proc/<pid>/task/*/schedstat``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT / "bench")]

import real_node_lab  # noqa: E402
from ciliary.lab import labimage  # noqa: E402
from ciliary.lab.lab import Lab  # noqa: E402
from ciliary.lab.layout import WORLD_DNS_IP  # noqa: E402

NS = "benchdns"
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NS, "labels": {"app": "c"}},
       "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "lab", "ports": [{"containerPort": 80}]}]}}
CNP = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "dns", "namespace": NS},
       "spec": {"endpointSelector": {"matchLabels": {"app": "c"}}, "egress": [
           {"toCIDR": [f"{WORLD_DNS_IP}/32"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                                                            "rules": {"dns": [{"matchPattern": "*.world.test"}]}}]},
           {"toFQDNs": [{"matchName": "api.world.test"}], "toPorts": [{"ports": [{"port": "80",
                                                                                   "protocol": "TCP"}]}]}]}}

LOADGEN = r"""
import json, random, select, socket, struct, sys, time
server, seconds, window = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def query(txid):
    head = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0)
    name = b"".join(bytes([len(p)]) + p for p in b"api.world.test".split(b".")) + b"\0"
    return head + name + struct.pack("!HH", 1, 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((server, 53))
sock.setblocking(False)
pending, lat, lost, ids = {}, [], 0, iter(range(1, 1 << 30))
end = time.monotonic() + seconds
def send():
    txid = next(ids) & 0xFFFF
    pending[txid] = time.monotonic()
    sock.send(query(txid))
for _ in range(window):
    send()
while time.monotonic() < end:
    ready, _, _ = select.select([sock], [], [], 0.05)
    now = time.monotonic()
    if ready:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                break
            sent = pending.pop(struct.unpack("!H", data[:2])[0], None)
            if sent is not None:
                lat.append(now - sent)
                send()
    for txid, sent in list(pending.items()):
        if now - sent > 1.0:
            del pending[txid]
            lost += 1
            send()
lat.sort()
pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3) if lat else None
print(json.dumps({"answers": len(lat), "qps": round(len(lat) / seconds, 1), "lost": lost,
                  "p50_ms": pick(0.5), "p99_ms": pick(0.99)}))
"""


def agent_cpu_ns(pid: int) -> int:
    """CPU time the agent ``pid`` has used so far, all threads (ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[0])
        except OSError:
            continue
    return total


def load(lab: Lab, seconds: float, window: int) -> dict[str, float]:
    netns, _ = lab.pod_target("client", NS)
    pid = real_node_lab.agent_pid(lab, "node-1")
    began, average = agent_cpu_ns(pid), os.getloadavg()[0]
    out = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c", LOADGEN, WORLD_DNS_IP,
                          str(seconds), str(window)], capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["agent_us"] = (agent_cpu_ns(pid) - began) / max(1, result["answers"]) / 1e3
    result["load"] = average
    return result


def run(lab: Lab, seconds: float, windows: list[int]) -> None:
    real_node_lab.ensure_ready(lab)
    lab.kubectl("create", "namespace", NS)
    lab.kubectl("apply", "-f", "-", input=labimage.manifest_for_real_nodes(json.dumps(POD)))
    lab.kubectl("wait", "--for=condition=Ready", "--timeout=180s", "-n", NS, "pod/client")
    direct = {w: load(lab, seconds, w) for w in windows}
    lab.kubectl("apply", "-f", "-", input=json.dumps(CNP))
    lab.kubectl("wait", "--for=condition=Enforced", "--timeout=120s", "-n", NS, "cnp/dns")
    load(lab, 1.0, 1)  # warm-up: the first answer is learnt (toFQDNs) and applied
    proxied = {w: load(lab, seconds, w) for w in windows}
    print(f"DNS over UDP, {seconds:g} s per run, one pod -> {WORLD_DNS_IP} (api.world.test)")
    print(f"{'window':>6} {'direct q/s':>11} {'proxy q/s':>10} {'ratio':>6} {'direct p50/p99 ms':>18} "
          f"{'proxy p50/p99 ms':>17} {'lost':>5} {'agent us/answer':>15} {'load':>9}")
    for w in windows:
        d, p = direct[w], proxied[w]
        ratio = p["qps"] / d["qps"] if d["qps"] else 0.0
        print(f"{w:>6} {d['qps']:>11} {p['qps']:>10} {ratio:>6.2f} {d['p50_ms']!s:>8}/{d['p99_ms']!s:<9} "
              f"{p['p50_ms']!s:>8}/{p['p99_ms']!s:<8} {int(d['lost']) + int(p['lost']):>5} "
              f"{d['agent_us']:>6.0f}/{p['agent_us']:<8.0f} {d['load']:>4.1f}/{p['load']:<4.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", default="1,32", help="queries outstanding (comma separated)")
    parser.add_argument("--lab", metavar="DIR", help="run on this real-node lab, already up (its state directory)")
    parser.add_argument("--smoke", action="store_true", help="one short run")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.window = 1.0, "4"
    windows = [int(w) for w in args.window.split(",")]
    with real_node_lab.real_lab("benchdns", "d", args.lab) as lab:
        try:
            run(lab, args.seconds, windows)
        finally:
            if args.lab:  # an own lab goes as a whole
                real_node_lab.delete_namespace(lab, NS)


if __name__ == "__main__":
    main()
