"""``make demo``: bring the lab up and show pods on two nodes talking.

Creates a namespace ``demo`` with two pods pinned to different nodes and one the
lab schedules, then shows TCP (HTTP) and UDP (echo) between them, across nodes and
on one node, and to and from the world host. Every step prints the command a user
would type to do the same by hand.
"""

from __future__ import annotations

import json
import sys
import time

from ciliary.lab.lab import Lab, LabError
from ciliary.lab.layout import WORLD_IP

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: web, image: lab, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-2
  containers: [{name: web, image: lab, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  nodeName: node-1
  containers: [{name: client, image: lab}]
"""

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def show(cmd: str) -> None:
    print(f"{DIM}$ {cmd}{RESET}", flush=True)


def wait_running(lab: Lab, names: list[str], seconds: float = 90) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pods = json.loads(lab.kubectl("get", "pods", "-n", "demo", "-o", "json").stdout)["items"]
        running = {p["metadata"]["name"]: p for p in pods if p["status"].get("phase") == "Running"}
        if set(names) <= set(running):
            return running
        time.sleep(0.5)
    raise LabError("demo pods did not become Running; see `ciliary lab status`")


def probe(lab: Lab, pod: str | None, kind: str, ip: str, port: int = 0) -> bool:
    where = f"{pod}" if pod else "--world"
    args = [sys.executable, "-m", "ciliary.lab.probe", kind, ip] + ([str(port)] if port else [])
    show(f"ciliary lab exec {'-n demo ' + where if pod else where} -- python -m ciliary.lab.probe {kind} {ip}"
         + (f" {port}" if port else ""))
    code = lab.exec(args, pod=pod, namespace="demo", world=pod is None)
    print(f"   {GREEN}landed{RESET}" if code == 0 else f"   {RED}no answer{RESET}", flush=True)
    return code == 0


def run() -> int:
    lab = Lab.from_env()
    step("Bringing the lab up (real etcd, kube-apiserver, kube-controller-manager; 2 nodes; world host)")
    show("ciliary lab up --nodes 2")
    lab.up(2)
    step("Creating pods with kubectl")
    show("kubectl apply -f demo.yaml")
    print(lab.kubectl("apply", "-f", "-", input=MANIFEST).stdout.strip())
    pods = wait_running(lab, ["web-1", "web-2", "client"])
    show("kubectl get pods -n demo -o wide")
    print(lab.kubectl("get", "pods", "-n", "demo", "-o", "wide").stdout.strip())
    ip = {name: str(pod["status"]["podIP"]) for name, pod in pods.items()}  # type: ignore[index]
    ok = True
    step("TCP across nodes: client (node-1) -> web-2 (node-2), HTTP on port 80")
    ok &= probe(lab, "client", "http", ip["web-2"], 80)
    step("TCP on the same node: client (node-1) -> web-1 (node-1)")
    ok &= probe(lab, "client", "http", ip["web-1"], 80)
    step("UDP across nodes and on one node: echo on port 53")
    ok &= probe(lab, "client", "udp", ip["web-2"], 53)
    ok &= probe(lab, "client", "udp", ip["web-1"], 53)
    step(f"Pods reach the world host ({WORLD_IP}), and the world reaches pods")
    ok &= probe(lab, "client", "http", WORLD_IP, 80)
    ok &= probe(lab, None, "http", ip["web-2"], 80)
    step("Where everything runs")
    show("ciliary lab status")
    print(lab.status())
    print(f"\n{BOLD}Try it yourself:{RESET} eval $(ciliary lab env); kubectl get pods -A -o wide; "
          "ciliary lab exec -n demo client -- ping -c1 " + ip["web-2"])
    print("Remove everything with: ciliary lab down")
    return 0 if ok else 1


def main() -> int:
    try:
        return run()
    except LabError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
