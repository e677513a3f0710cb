"""The real-node lab a bench runs on, and how a bench reaches inside one of its nodes.

A bench either brings up a lab of its own (``reallab.up``: kubelets and containerd per node, Ciliary
installed by its Helm chart, as ``ciliary lab up``; under ``.lab-<kind>-<pid>``, taken down afterwards,
also on failure) or runs on a real-node lab already up (``--lab DIR``: the state directory ``ciliary lab
up`` left, its prefix from ``CILIARY_LAB_PREFIX`` as the CLI's; nothing is brought up or taken down,
the bench removes only the namespace it made). The smoke tests use the second way on the test session's
lab, so ``make test`` pays for no lab of its own per bench.

A chart-mode node keeps its bpffs (the agent's pinned maps) in a mount namespace of its own, the one its
containerd started; :func:`node_mounts_argv` enters it, together with the node's network namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "nodeagent"), str(ROOT / "e2e")]

from ciliary.cli.agent_access import AGENT_SELECTOR  # noqa: E402
from ciliary.lab import chartinstall, kubeletnode, processes, reallab, sessions  # noqa: E402
from ciliary.lab.lab import Lab, LabError  # noqa: E402
from ciliary.lab.layout import Binaries  # noqa: E402
from ciliary.lab.topology import NETNS_DIR  # noqa: E402

NODES = ("node-1", "node-2")


class BenchLabError(RuntimeError):
    """The lab a bench was pointed at cannot carry it; says which lab and why."""


def attached(state_dir: str) -> Lab:
    """A real-node lab with the chart that is already up (``--lab DIR``; ``reallab.attached``)."""
    try:
        return reallab.attached(state_dir)
    except LabError as exc:
        raise BenchLabError(f"--lab {exc}") from exc


def exit_on_sigterm() -> None:
    """SIGTERM (a timeout, a Ctrl-C'd parent) ends the bench through its ``finally`` blocks: pods, the
    bench's namespace and its own lab are removed as on any other exit."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextlib.contextmanager
def real_lab(kind: str, letter: str, attach: str | None, *, nodes: Sequence[str] = NODES,
             kube_proxy_replacement: bool = False, kube_proxy: str | None = None) -> Iterator[Lab]:
    """The lab the bench runs on: ``attach`` (a state directory) or one of its own, up for the block. Says
    which on stdout (``lab: attached to DIR`` / ``lab: own lab DIR``)."""
    exit_on_sigterm()
    if attach:
        lab = attached(attach)
        print(f"lab: attached to {lab.layout.state_dir}", flush=True)
        yield lab
        return
    sessions.reap_stale(ROOT, kind, letter)
    lab = Lab(sessions.session_layout(ROOT, kind, letter), Binaries.discover())
    try:
        print(f"lab: own lab {lab.layout.state_dir}", flush=True)
        reallab.up(lab, list(nodes), chart=True, ready_seconds=420, kube_proxy_replacement=kube_proxy_replacement,
                   kube_proxy=kube_proxy)
        yield lab
    finally:
        lab.down(log=False)


def ensure_ready(lab: Lab, seconds: float = 300) -> None:
    """Every agent, the operator and etcd Ready (an attached lab may still be starting them)."""
    chartinstall.wait_ready(lambda *a, **k: lab.kubectl(*a, **k), lab.node_names(), seconds)


def node_mounts_argv(lab: Lab, node: str) -> list[str]:
    """``nsenter`` into ``node``'s network and mount namespaces (its own bpffs, /run/ciliary)."""
    pid = processes.running_pid(lab.layout, f"containerd-{node}")
    if pid is None:
        raise BenchLabError(f"{node}: its containerd is not running (its mount namespace is the node's)")
    return ["nsenter", f"--net={NETNS_DIR / lab.layout.node_netns(node)}", f"--mount=/proc/{pid}/ns/mnt", "--wd=/"]


def operator_log(lab: Lab, since: str | None = None) -> str:
    """The chart operator's log (its current container; ``since``, e.g. ``5s``: only that recent part; empty if
    none answers)."""
    out = lab.kubectl("logs", "-n", chartinstall.NAMESPACE, f"deployment/{chartinstall.RELEASE}-operator",
                      "-c", "operator", *([f"--since={since}"] if since else ["--tail=-1"]), check=False)
    return out.stdout if out.returncode == 0 else ""


def agent_pid(lab: Lab, node: str) -> int:
    """The host pid of ``node``'s agent: the chart DaemonSet pod's ``agent`` container (its entrypoint execs
    the agent)."""
    pods = agent_pods(lab, node)
    if not pods:
        raise BenchLabError(f"no agent pod on {node}")
    return kubeletnode.container_pid(lab.layout, pods[0], "agent")


def agent_pods(lab: Lab, node: str) -> list[dict[str, Any]]:
    """The chart's agent pod on ``node`` (a list: none while the DaemonSet replaces it)."""
    out = lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l", AGENT_SELECTOR, "--field-selector", f"spec.nodeName={node}", "-o", "json", check=False)
    return list(json.loads(out.stdout)["items"]) if out.returncode == 0 else []


def proxy_pids(lab: Lab, mode: str) -> dict[str, int]:
    """The processes counted as a proxy's per-connection CPU on each node: the agent (``ciliary``: socket load
    balancing is in the kernel, the agent reads the connections' flow events) or kube-proxy (the peers: their
    labs' agents read the same flow events and are not counted, so the figures are not comparable)."""
    if mode == "ciliary":
        return {node: agent_pid(lab, node) for node in NODES}
    pids = {node: processes.running_pid(lab.layout, f"kube-proxy-{node}") for node in NODES}
    return {node: pid for node, pid in pids.items() if pid}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chart_etcd(lab: Lab) -> tuple[float, float]:
    """The chart's etcd: (RSS in MiB of its container's process, its database's size in MiB from its metrics,
    served on its node's address, port 2381)."""
    out = lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, f"{chartinstall.RELEASE}-etcd-0", "-o", "json")
    pod = json.loads(out.stdout)
    rss = processes.rss_kib(kubeletnode.container_pid(lab.layout, pod, "etcd")) / 1024
    node = pod["spec"]["nodeName"]
    metrics = subprocess.run(["ip", "netns", "exec", lab.layout.node_netns(node), "curl", "-s", "-m", "5",
                              f"http://{pod['status']['hostIP']}:2381/metrics"],
                             capture_output=True, text=True, timeout=30).stdout
    size = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("etcd_mvcc_db_total_size_in_bytes ")]
    if not size:
        raise BenchLabError(f"the chart's etcd on {node} did not serve its database size")
    return rss, size[0] / (1 << 20)


def agent_log(lab: Lab, node: str) -> str:
    """``node``'s agent log (its pod's ``agent`` container; empty if none answers)."""
    pods = agent_pods(lab, node)
    if not pods:
        return ""
    out = lab.kubectl("logs", "-n", chartinstall.NAMESPACE, pods[0]["metadata"]["name"], "-c", "agent", "--tail=-1",
                      check=False)
    return out.stdout if out.returncode == 0 else ""


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (``/proc/<pid>/task/*/children``; a process gone meanwhile is skipped)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return found


def delete_namespace(lab: Lab, namespace: str, seconds: float = 120) -> bool:
    """Delete a bench's namespace on an attached lab (an own lab goes as a whole) and wait until it is gone,
    at most ``seconds``: False if it is still there. Polls instead of ``kubectl delete --wait``, which one
    kubectl call (limited to 120 s) cannot do for 10,000 Services; a failing or slow kubectl is asked again."""
    deadline = time.monotonic() + seconds
    deleted = False
    while time.monotonic() < deadline:
        try:
            if not deleted:
                deleted = lab.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false",
                                      check=False).returncode == 0
            out = lab.kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name", check=False)
            if deleted and out.returncode == 0 and not out.stdout.strip():
                return True
        except subprocess.TimeoutExpired:
            pass  # a busy apiserver: ask again
        time.sleep(1)
    return False
