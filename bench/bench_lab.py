"""Lab start-up and footprint: ``ciliary lab up`` time for 2 and 4 real nodes, RSS per process and container.

Run as root from the repository root:  python -m bench.bench_lab [--nodes 2 4]

Each size gets a fresh real-node lab (kubelet and containerd per node, Ciliary installed by its Helm chart,
as ``ciliary lab up``; its own prefix and state directory under ``.lab-benchlab-<pid>``), taken down
afterwards, also on failure. Two times: every node Ready (``reallab.up`` returned: nodes Ready, every image
in every node), and every agent, the operator and etcd Ready (the chart's pods). The images are the
set-up's (warm: built and cached before); a cold set-up is ``make setup`` on a fresh machine.

Footprint five seconds after: the RSS of each lab process this shell started (control plane, per-node
containerd and kubelet, registry, gateway) and of each running container, counted with every process it
started (the agent's Envoy is the agent container's). RSS counts shared pages once per process. Figures
are printed, never asserted (machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict

from bench import real_node_lab

from ciliary.lab import kubeletnode, processes
from ciliary.lab.lab import Lab


def tree_rss_kib(pid: int) -> int:
    """RSS of ``pid`` and every process below it (KiB)."""
    return sum(processes.rss_kib(p) for p in real_node_lab.descendants(pid))


def footprint(lab: Lab) -> dict[str, list[int]]:
    """RSS (KiB) by process kind (``containerd``, ``kubelet``, ...) and by container (``<namespace>/<name>``)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for name in processes.names(lab.layout):
        pid = processes.running_pid(lab.layout, name)
        groups[name.rsplit("-node-", 1)[0]].append(tree_rss_kib(pid) if pid else 0)
    pods = json.loads(lab.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses", []):
            if "running" not in status.get("state", {}):
                continue
            with contextlib.suppress(kubeletnode.NodeStartError):
                pid = kubeletnode.container_pid(lab.layout, pod, status["name"])
                groups[f"container {pod['metadata']['namespace']}/{status['name']}"].append(tree_rss_kib(pid))
    return groups


def measure(nodes: int) -> tuple[float, float, dict[str, list[int]]]:
    t0 = time.monotonic()
    with real_node_lab.real_lab("benchlab", "b", None, nodes=[f"node-{i}" for i in range(1, nodes + 1)]) as lab:
        ready = time.monotonic() - t0
        real_node_lab.ensure_ready(lab)
        agents = time.monotonic() - t0
        time.sleep(5)  # let the processes settle after start-up
        return ready, agents, footprint(lab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    for nodes in args.nodes:
        ready, agents, groups = measure(nodes)
        print(f"\n== lab up with {nodes} real nodes: all nodes Ready in {ready:.1f} s, "
              f"every agent, the operator and etcd Ready in {agents:.1f} s")
        print(f"{'process or container':<34}{'count':>6}{'RSS each (MiB)':>18}{'total (MiB)':>14}")
        for group, values in sorted(groups.items()):
            each = f"{min(values) / 1024:.0f}" if min(values) == max(values) else \
                f"{min(values) / 1024:.0f}-{max(values) / 1024:.0f}"
            print(f"{group:<34}{len(values):>6}{each:>18}{sum(values) / 1024:>14.0f}")
        count = sum(len(v) for v in groups.values())
        print(f"{'all':<34}{count:>6}{'':>18}{sum(sum(v) for v in groups.values()) / 1024:>14.0f}")


if __name__ == "__main__":
    main()
