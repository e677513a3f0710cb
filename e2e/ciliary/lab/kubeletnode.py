"""A real lab node: containerd and kubelet inside the node's network namespace.

Per node (paths in ``ciliary.lab.nodeconfig.NodePaths``): containerd with its own root, state,
socket, runc root and CNI directories (the CNI network is ``ciliary-cni`` with the node's pod CIDR
and agent socket); a kubelet with its own root, certificates, pod logs and cgroup root, whose
kubeconfig points at the gateway's relay on ``127.0.0.1:6443`` inside the namespace.

Both processes run through ``nsenter --net`` (which, unlike ``ip netns exec``, keeps
/sys/fs/cgroup as it is) and start inside ``<cgroup root>/system`` in every cgroup hierarchy, so
containerd's shims and every container live under the node's cgroup root too. ``teardown``
therefore finds everything the node made even after a crash: it asks containerd to remove its
tasks (so shims exit and remove their sockets), stops the processes, kills whatever is left in the
cgroup root, unmounts what containerd mounted (rootfs overlays, shm, pod netns) and deletes the
node's directories.

Chart mode (``chart=True``, Ciliary installed by its Helm chart): containerd starts in a new mount
namespace of its own (``nodeconfig.private_mounts_script``: the node's own /etc, /opt, /var/lib,
/run/ciliary and bpffs, so the chart's hostPaths never collide between nodes nor touch the host) and
the kubelet joins it; the CNI plugin and its configuration are left to the chart's install-cni, and
the kubelet's cluster DNS is the node's CoreDNS. The namespace and its mounts vanish with the node's
last process, so teardown is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliary.lab import images, nodeconfig, nodehost, pki, processes, tools
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.layout import Binaries, LabLayout, node_index, node_ip
from ciliary.lab.nodebins import NodeBinaries
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT, Host, NodePaths
from ciliary.lab.topology import NETNS_DIR

CONTAINER_LOGS = Path("/var/log/containers")
SHIM_SOCKETS = Path("/run/containerd/s")
CNI_RESULTS = Path("/var/lib/cni/results")
RUN_ROOT = Path("/run/ciliary-nodes")


#: where containerd keeps a pod's network namespace file below its state directory (``netns_mounts_under_state_dir``)
CRI_NETNS_SUBDIR = "io.containerd.grpc.v1.cri/netns"


def pod_netns_mount(layout: LabLayout) -> tuple[str, str]:
    """The chart's ``agent.podNetnsDir`` and ``agent.podNetnsSubdir`` for this lab: the host directory of every
    node's run directory, and below it a node's pods' network namespaces (``$(CILIARY_AGENT_NODE_NAME)``, expanded
    by the kubelet), where each agent looks for its own node's. Pure."""
    node = "$(CILIARY_AGENT_NODE_NAME)"
    paths = node_paths(layout, node)
    return str(paths.run.parent), str((paths.containerd_state / CRI_NETNS_SUBDIR).relative_to(paths.run.parent))


class NodeStartError(RuntimeError):
    """A real node's containerd or kubelet did not come up; carries the node and the log tail."""

    def __init__(self, node: str, message: str, log: Path | None = None) -> None:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        super().__init__(f"{node}: {message}" + (f"\nlast log lines ({log}):\n{tail}" if tail else ""))
        self.node = node


def node_paths(layout: LabLayout, node: str) -> NodePaths:
    # not under /run/ciliary: a chart-mode node binds its own directory there
    return NodePaths(node=node, state=layout.node_dir(node), run=RUN_ROOT / layout.prefix / node,
                     cgroup_root=f"/ciliary-{layout.prefix}-{node}")


def kubelet_cert(node: str) -> str:
    return f"kubelet-{node}"


@dataclass
class RealNode:
    layout: LabLayout
    node: str
    bins: NodeBinaries
    kube: Binaries
    host: Host
    cgroups: nodehost.CgroupLayout
    chart: bool = False

    @property
    def paths(self) -> NodePaths:
        return node_paths(self.layout, self.node)

    @property
    def netns(self) -> str:
        return self.layout.node_netns(self.node)

    @property
    def ip(self) -> str:
        return node_ip(node_index(self.node))

    def proc_name(self, what: str) -> str:
        return f"{what}-{self.node}"

    # --- files ---------------------------------------------------------------
    def prepare(self, pod_cidr: str, cni_plugin: Path, registry_port: int | None = None) -> None:
        """Directories, certificates, kubeconfig and the containerd, kubelet and CNI configuration."""
        p = self.paths
        if registry_port:
            host, hosts_toml = nodeconfig.registry_hosts(registry_port)
            (p.registry_hosts_dir / host).mkdir(parents=True, exist_ok=True)
            (p.registry_hosts_dir / host / "hosts.toml").write_text(hosts_toml)
        for d in (p.state, p.run, p.containerd_root, p.cni_bin_dir, p.cni_conf_dir, p.ipam_dir, p.kubelet_root,
                  p.kubelet_cert_dir, p.pod_logs, p.host_dir):
            d.mkdir(parents=True, exist_ok=True)
        pki.ensure_cert(self.layout.pki_dir, kubelet_cert(self.node),
                        f"/O=system:nodes/CN=system:node:{self.node}")
        write_kubeconfig(p.kubelet_kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}",
                         pki=self.layout.pki_dir, user=kubelet_cert(self.node))
        p.containerd_config.write_text(nodeconfig.render_toml(nodeconfig.containerd_config(p, self.host)))
        p.kubelet_config.write_text(nodeconfig.dump_yaml(nodeconfig.kubelet_config(
            p, self.host, client_ca=self.layout.pki_dir / "ca.crt",
            cluster_dns=nodeconfig.CLUSTER_DNS_IP if self.chart else None)))
        p.resolv_conf.write_text("nameserver 127.0.0.1\noptions ndots:5\n")
        nodehost.ensure_cgroup_root(self.cgroups, p.cgroup_root)
        nodehost.ensure_cgroup_root(self.cgroups, f"{p.cgroup_root}/system")
        if self.chart:
            (p.host_dir / "mounts.sh").write_text(nodeconfig.private_mounts_script(p))
            return  # the chart's install-cni writes the plugin and its configuration
        link = p.cni_bin_dir / "ciliary-cni"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(cni_plugin)
        conflist = nodeconfig.cni_conflist(p, pod_cidr, self.layout.agent_socket(self.node))
        (p.cni_conf_dir / "10-ciliary.conflist").write_text(json.dumps(conflist, indent=2))

    def _node_argv(self, argv: Sequence[str], mount_ns: Sequence[str] = ()) -> list[str]:
        """``argv`` in the node's network namespace and in ``<cgroup root>/system`` everywhere."""
        procs = " ".join(str(m / self.paths.cgroup_root.lstrip("/") / "system" / "cgroup.procs")
                         for m in self.cgroups.hierarchies())
        script = f'for f in {procs}; do echo $$ > "$f" || exit 1; done; exec "$@"'
        return ["sh", "-c", script, "sh", "nsenter", f"--net={NETNS_DIR / self.netns}", *mount_ns, *argv]

    def _containerd_mount_ns(self) -> list[str]:
        """Chart mode: a new mount namespace (slave of the host's) set up by the node's mounts script."""
        if not self.chart:
            return []
        return ["unshare", "--mount", "--propagation", "slave", "sh", str(self.paths.host_dir / "mounts.sh")]

    def _kubelet_mount_ns(self) -> list[str]:
        """Chart mode: the kubelet joins containerd's mount namespace (hostPaths must mean the same to both)."""
        if not self.chart:
            return []
        pid = processes.running_pid(self.layout, self.proc_name("containerd"))
        if pid is None:
            raise NodeStartError(self.node, "containerd is not running: its mount namespace is the node's")
        return [f"--mount=/proc/{pid}/ns/mnt", "--wd=/"]

    def _env(self) -> dict[str, str]:
        # containerd finds containerd-shim-runc-v2 and runc on PATH
        return {"PATH": f"{self.bins.containerd.parent}:{self.bins.runc.parent}:{os.environ.get('PATH', '')}"}

    # --- processes -----------------------------------------------------------
    def start_containerd(self, *, seconds: float = 30) -> None:
        name = self.proc_name("containerd")
        if not processes.running_pid(self.layout, name):
            processes.spawn(self.layout, name, self._node_argv(
                [str(self.bins.containerd), "--config", str(self.paths.containerd_config), "--log-level", "info"],
                self._containerd_mount_ns()),
                env=self._env())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not processes.running_pid(self.layout, name):
                raise NodeStartError(self.node, "containerd exited", self.layout.log_dir / f"{name}.log")
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise NodeStartError(self.node, f"containerd not answering after {seconds:.0f} s",
                             self.layout.log_dir / f"{name}.log")

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bins.ctr), "--address", str(self.paths.containerd_socket),
                               "--namespace", "k8s.io", *args], capture_output=True, text=True, check=check,
                              timeout=timeout)

    def import_images(self, built: Sequence[images.BuiltImage]) -> None:
        for image in built:
            images.import_image(self.bins.ctr, self.paths.containerd_socket, image)

    def start_kubelet(self) -> None:
        name = self.proc_name("kubelet")
        if processes.running_pid(self.layout, name):
            return
        processes.spawn(self.layout, name, self._node_argv(nodeconfig.kubelet_argv(
            self.bins.kubelet, self.paths, self.ip), self._kubelet_mount_ns()), env=self._env())
        processes.wait_alive(self.layout, name, 2.0)

    def start_runtime(self, pod_cidr: str, cni_plugin: Path, registry_port: int | None = None) -> None:
        """Files and containerd (no apiserver needed: images can be imported while the cluster starts)."""
        self.prepare(pod_cidr, cni_plugin, registry_port)
        self.start_containerd()

    def start(self, built: Sequence[images.BuiltImage], pod_cidr: str, cni_plugin: Path,
              registry_port: int | None = None) -> None:
        self.start_runtime(pod_cidr, cni_plugin, registry_port)
        self.import_images(built)
        self.start_kubelet()

    def alive(self) -> dict[str, bool]:
        return {what: processes.running_pid(self.layout, self.proc_name(what)) is not None
                for what in ("containerd", "kubelet")}

    # --- teardown --------------------------------------------------------------
    def teardown(self) -> None:
        teardown_node(self.layout, self.node, self.bins, self.cgroups)


def _remove_tasks(bins: NodeBinaries, socket: Path) -> None:
    """Ask containerd to kill and delete every task, so the shims exit cleanly (bounded)."""
    base = [str(bins.ctr), "--address", str(socket), "--namespace", "k8s.io"]
    try:
        listed = subprocess.run([*base, "tasks", "list", "-q"], capture_output=True, text=True, timeout=10)
        for task in listed.stdout.split():
            subprocess.run([*base, "tasks", "kill", "--signal", "SIGKILL", task], capture_output=True, timeout=10)
            subprocess.run([*base, "tasks", "delete", "--force", task], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        pass


def shim_socket_names(containerd_address: Path, namespace: str, ids: Sequence[str]) -> list[str]:
    """Names of the shim sockets containerd keeps in the machine-wide ``/run/containerd/s``.

    A shim's socket is named by the sha256 of ``<containerd address>/<namespace>/<id>`` (and of the
    same with ``/debug``), so a node's own sockets are found from its task ids without touching
    another containerd's.
    """
    names = []
    for task in ids:
        for suffix in ("", "/debug"):
            names.append(hashlib.sha256(f"{containerd_address}/{namespace}/{task}{suffix}".encode()).hexdigest())
    return names


def task_ids(paths: NodePaths) -> list[str]:
    """Tasks (containers and sandboxes) the node's containerd has state for, also after a crash."""
    tasks = paths.containerd_state / "io.containerd.runtime.v2.task" / "k8s.io"
    return sorted(d.name for d in tasks.iterdir()) if tasks.is_dir() else []


def remove_machine_wide_leftovers(paths: NodePaths, ids: Sequence[str]) -> None:
    """The node's entries in machine-wide directories: shim sockets, libcni's cached results."""
    for name in shim_socket_names(paths.containerd_socket, "k8s.io", ids):
        (SHIM_SOCKETS / name).unlink(missing_ok=True)
    if CNI_RESULTS.is_dir():
        for task in ids:
            for cached in CNI_RESULTS.glob(f"{nodeconfig.CNI_NETWORK}-{task}-*"):
                cached.unlink(missing_ok=True)


def mounts_under(roots: Sequence[Path], mountinfo: str) -> list[Path]:
    """Mount points below any of ``roots`` (deepest first), from /proc/self/mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if any(point == r or r in point.parents for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all(roots: Sequence[Path]) -> list[Path]:
    done = []
    for _ in range(3):  # a mount may hide another on the same point
        points = mounts_under(roots, Path("/proc/self/mountinfo").read_text())
        if not points:
            break
        for point in points:
            if subprocess.run(["umount", str(point)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "--lazy", str(point)], capture_output=True, timeout=30)
            done.append(point)
    return done


def teardown_node(layout: LabLayout, node: str, bins: NodeBinaries | None,
                  cgroups: nodehost.CgroupLayout | None = None) -> None:
    """Remove everything a real node made: processes, containers, mounts, cgroups, directories."""
    paths = node_paths(layout, node)
    ids = task_ids(paths)
    processes.stop(layout, f"kubelet-{node}", timeout=10)
    if bins is not None and processes.running_pid(layout, f"containerd-{node}"):
        _remove_tasks(bins, paths.containerd_socket)
    processes.stop(layout, f"containerd-{node}", timeout=10)
    nodehost.remove_cgroup_root(cgroups or nodehost.cgroup_layout(), paths.cgroup_root)
    unmount_all([paths.state, paths.run])
    remove_machine_wide_leftovers(paths, [*ids, *task_ids(paths)])
    if CONTAINER_LOGS.is_dir():
        for link in CONTAINER_LOGS.iterdir():
            try:
                if link.is_symlink() and paths.pod_logs in Path(os.readlink(link)).parents:
                    link.unlink()
            except OSError:
                continue
    for d in (paths.run, paths.state):
        if d.exists() and not mounts_under([d], Path("/proc/self/mountinfo").read_text()):
            shutil.rmtree(d, ignore_errors=True)


def teardown_all(layout: LabLayout) -> list[str]:
    """Tear down every real node of ``layout`` (``lab down`` calls this first, also after a crash)."""
    found = real_nodes_of(layout)
    if not found:
        return []
    try:
        bins: NodeBinaries | None = NodeBinaries.discover()
    except (OSError, tools.VersionsFileError):
        bins = None  # no versions.env here: skip the graceful task removal, the cgroup kill still works
    # nodes are independent: side by side (most of the time is waiting for processes to exit)
    with ThreadPoolExecutor(max_workers=len(found)) as pool:
        for done in [pool.submit(teardown_node, layout, node, bins) for node in found]:
            done.result()
    return found


def real_nodes_of(layout: LabLayout) -> list[str]:
    """Nodes of ``layout`` that ran (or began to run) containerd, found on disk."""
    nodes = layout.state_dir / "nodes"
    return sorted(d.name for d in nodes.iterdir() if (d / "containerd.toml").exists()) if nodes.is_dir() else []


def cni_plugin_path() -> Path:
    local = Path(sys.executable).parent / "ciliary-cni"
    found = local if local.exists() else shutil.which("ciliary-cni")
    if not found:
        raise FileNotFoundError("ciliary-cni is not installed (run setup/setup.sh)")
    return Path(found)


def container_pid(layout: LabLayout, pod: dict[str, Any], container: str | None = None) -> int:
    """The host pid of a running container's task (its init process) on a real node, from the node's
    containerd: ``container`` by name, or the pod's first running container."""
    name = f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"
    node = pod["spec"].get("nodeName")
    ids = [s["containerID"].split("://", 1)[-1] for s in pod.get("status", {}).get("containerStatuses", [])
           if s.get("containerID") and "running" in s.get("state", {}) and container in (None, s.get("name"))]
    if not node or not ids:
        raise NodeStartError(str(node), f"pod {name} has no running container{f' {container}' if container else ''}")
    bins = NodeBinaries.discover()
    listed = subprocess.run([str(bins.ctr), "--address", str(node_paths(layout, node).containerd_socket),
                             "--namespace", "k8s.io", "tasks", "list"], capture_output=True, text=True, timeout=30)
    pids = {fields[0]: fields[1] for fields in (line.split() for line in listed.stdout.splitlines()[1:])
            if len(fields) >= 2 and fields[1].isdigit()}
    if ids[0] not in pids:
        raise NodeStartError(node, f"pod {name}: container {ids[0][:12]} has no task on {node}")
    return int(pids[ids[0]])


def pod_exec_target(layout: LabLayout, pod: dict[str, Any]) -> tuple[Path, Path | None]:
    """Where ``ciliary lab exec`` runs for a pod on a real node: its first running container's network
    namespace (``/proc/<pid>/ns/net``, the pid from the node's containerd) and cgroup v2 group."""
    pid = container_pid(layout, pod)
    unified = nodehost.cgroup_layout().unified
    group = next((line.split("::", 1)[1] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                  if line.startswith("0::")), None) if unified else None
    return Path(f"/proc/{pid}/ns/net"), (unified / group.lstrip("/") if unified and group else None)
