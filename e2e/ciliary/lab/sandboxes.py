"""Realising one pod on one lab node: network namespace, CNI ADD, cgroup, workload.

This is the part a container runtime plays for a kubelet. It calls Ciliary's CNI
plugin exactly as the CNI specification says (environment + network configuration
on stdin, result or error JSON on stdout), from inside the node's network
namespace, as a kubelet on that node would. Every step is undone when a later one
fails, and ``teardown`` is idempotent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ciliary.lab import cgroups, topology
from ciliary.lab.layout import LabLayout

CNI_VERSION = "1.0.0"


class SandboxError(RuntimeError):
    """A pod could not be realised; ``reason`` becomes the Kubernetes Event reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class PodSpecSummary:
    namespace: str
    name: str
    uid: str
    tcp_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)


@dataclass
class Sandbox:
    """What was created for a pod (persisted so a restarted runtime can adopt or remove it)."""

    namespace: str
    name: str
    uid: str
    netns: str
    container_id: str
    ipv4: str
    cgroup: str
    workload_pid: int

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{self.uid}.json"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.rename(directory / f"{self.uid}.json")

    @classmethod
    def load_all(cls, directory: Path) -> dict[str, Sandbox]:
        found: dict[str, Sandbox] = {}
        for path in directory.glob("*.json") if directory.exists() else []:
            try:
                box = cls(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            found[box.uid] = box
        return found


@dataclass(frozen=True)
class NodeContext:
    layout: LabLayout
    node: str
    pod_cidr: str
    cni_bin: Path
    python: str = sys.executable

    @property
    def state_dir(self) -> Path:
        return self.layout.node_dir(self.node) / "pods"

    def cni_config(self) -> dict[str, object]:
        return {
            "cniVersion": CNI_VERSION,
            "name": "ciliary",
            "type": "ciliary-cni",
            "mtu": 1500,
            "ipam": {"type": "host-local-ciliary", "subnet": self.pod_cidr,
                     "dataDir": str(self.layout.node_dir(self.node) / "ipam")},
            "agentSocket": str(self.layout.agent_socket(self.node)),
        }


def container_id(uid: str) -> str:
    return f"lab-{uid}"


def _cni(ctx: NodeContext, command: str, pod: PodSpecSummary, netns: str) -> dict[str, object]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id(pod.uid),
        "CNI_NETNS": str(topology.NETNS_DIR / netns),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(ctx.cni_bin.parent),
        "CNI_ARGS": (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                     f"K8S_POD_INFRA_CONTAINER_ID={container_id(pod.uid)};K8S_POD_UID={pod.uid}"),
    }
    if os.environ.get("PYTHONPATH"):  # development runs from a source tree
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    node_ns = topology.NETNS_DIR / ctx.layout.node_netns(ctx.node)
    proc = subprocess.run(
        ["nsenter", f"--net={node_ns}", str(ctx.cni_bin)],
        input=json.dumps(ctx.cni_config()), env=env, text=True, capture_output=True, timeout=60,
    )
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        out = {}
    if proc.returncode != 0:
        stderr_lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        msg = out.get("msg") or (stderr_lines[-1] if stderr_lines else f"exit status {proc.returncode}")
        code = out.get("code", "?")
        details = f" ({out['details']})" if out.get("details") else ""
        raise SandboxError("FailedCreatePodSandBox" if command == "ADD" else "FailedKillPod",
                           f"CNI {command} failed with code {code}: {msg}{details}")
    return out


def _start_workload(ctx: NodeContext, pod: PodSpecSummary, netns: str, cgroup: Path) -> int:
    argv = ["nsenter", f"--net={topology.NETNS_DIR / netns}", ctx.python, "-m", "ciliary.lab.podserver",
            "--name", f"{pod.namespace}/{pod.name}"]
    for port in pod.tcp_ports:
        argv += ["--tcp", str(port)]
    for port in pod.udp_ports:
        argv += ["--udp", str(port)]
    log_dir = ctx.layout.log_dir / "pods"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs_file = str(cgroup / "cgroup.procs")

    def enter_cgroup() -> None:  # runs in the child between fork and exec
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))

    with open(log_dir / f"{pod.namespace}_{pod.name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=enter_cgroup)
    deadline = time.monotonic() + 15
    logfile = log_dir / f"{pod.namespace}_{pod.name}.log"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] if logfile.exists() else []
            raise SandboxError("FailedStartWorkload",
                               f"workload exited with status {code}: {' '.join(tail) or 'no output'}")
        if logfile.exists() and f"serving {pod.namespace}/{pod.name}" in logfile.read_text(errors="replace"):
            return proc.pid
        time.sleep(0.05)
    proc.kill()
    raise SandboxError("FailedStartWorkload", "workload did not start within 15 s")


def check_ports(pod: PodSpecSummary) -> None:
    for proto, ports in (("TCP", pod.tcp_ports), ("UDP", pod.udp_ports)):
        seen: set[int] = set()
        for port in ports:
            if port in seen:
                raise SandboxError("PortConflict", f"containerPort {port}/{proto} is declared twice in the pod; "
                                                   "it can only be bound once")
            if not 1 <= port <= 65535:
                raise SandboxError("PortConflict", f"containerPort {port}/{proto} is out of range 1-65535")
            seen.add(port)


def realise(ctx: NodeContext, pod: PodSpecSummary) -> Sandbox:
    """Create everything for ``pod``; on failure undo what was done and raise SandboxError."""
    check_ports(pod)
    netns = ctx.layout.pod_netns(pod.namespace, pod.name, pod.uid)
    cgroup = cgroups.pod_cgroup(ctx.layout.cgroup_name, ctx.node, pod.uid)
    box = Sandbox(pod.namespace, pod.name, pod.uid, netns, container_id(pod.uid), "", str(cgroup), 0)
    try:
        topology.ensure_netns(netns)
        result = _cni(ctx, "ADD", pod, netns)
        ips = result.get("ips") or []
        if not isinstance(ips, list) or not ips:
            raise SandboxError("FailedCreatePodSandBox", "CNI ADD returned no IP address")
        box.ipv4 = str(ips[0]["address"]).split("/")[0]
        cgroups.ensure(cgroup)
        box.workload_pid = _start_workload(ctx, pod, netns, cgroup)
        box.save(ctx.state_dir)
        return box
    except (SandboxError, OSError, subprocess.SubprocessError, topology.TopologyError) as exc:
        teardown(ctx, box, pod)
        if isinstance(exc, SandboxError):
            raise
        raise SandboxError("FailedCreatePodSandBox", str(exc)) from exc


def teardown(ctx: NodeContext, box: Sandbox, pod: PodSpecSummary | None = None) -> list[str]:
    """Remove everything of a sandbox; returns problems met (never raises for missing parts)."""
    problems = []
    cgroups.remove_tree(Path(box.cgroup))
    summary = pod or PodSpecSummary(box.namespace, box.name, box.uid)
    if topology.netns_exists(box.netns) or box.ipv4:
        try:
            _cni(ctx, "DEL", summary, box.netns)
        except SandboxError as exc:
            problems.append(exc.message)
    if topology.netns_exists(box.netns):
        topology.ip("netns", "del", box.netns, check=False)
    (ctx.state_dir / f"{box.uid}.json").unlink(missing_ok=True)
    return problems


def workload_alive(box: Sandbox) -> bool:
    return box.workload_pid in cgroups.pids(Path(box.cgroup))
