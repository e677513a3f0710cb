"""Ciliary installed on a real-node lab by its own Helm charts, as on a user's cluster.

``helm install`` of ``charts/ciliary-crds`` and ``charts/ciliary`` (release ``ciliary`` in
``kube-system``) with the images the lab built and imported into every node's containerd (the chart's
``imagePullPolicy: IfNotPresent`` finds them; no registry pull). What the lab sets (``lab_values``):

- the bundled etcd's image: ``docker.io/lab/etcd:<version>``, the Go-built etcd binary of the lab's
  control plane alone in an image (``etcd_image``; the chart's default names registry.k8s.io's);
- no PersistentVolumeClaim for etcd (the lab has no storage provisioner): an emptyDir;
- ``agent.sysResource=false`` where the machine's root lacks CAP_SYS_RESOURCE (runc cannot grant what it
  does not hold; the kernel is checked to be >= 5.11, where BPF maps are not charged to RLIMIT_MEMLOCK);
- ``agent.loadBalancing.cgroupPath``: each node's own cgroup root (the chart's default, the host's cgroup2
  root, is right for a real node but here would be the whole machine's, shared by every lab node);
- the agents' ``--fqdn-min-ttl`` 1 s (``agent.extraEnv``): an address learnt from a
  DNS answer stays allowed for the answer's TTL, not the default hour, so expiry is testable.

Everything else is the chart's default: operator Deployment and bundled etcd on the node network
(``operator.hostNetwork``, ``etcd.hostNetwork``), agent DaemonSet whose ``install-cni`` init container
installs ``ciliary-cni`` and its configuration into the node's /opt/cni/bin and /etc/cni/net.d, per-node
etcd enrollment, TLS everywhere. ``wait_ready`` waits for the agents on every node, the operator and etcd.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ciliary.lab import images, nodehost, tools
from ciliary.lab.images import BuiltImage, file_digest
from ciliary.lab.layout import node_index, node_ip
from ciliary.lab.nodeconfig import NODE_SERVICES_IP
from ciliary.lab.ociimage import FileEntry, ImageConfig

RELEASE = "ciliary"
CRDS_RELEASE = "ciliary-crds"
NAMESPACE = "kube-system"
ETCD_IMAGE_REPOSITORY = "docker.io/lab/etcd"
ETCD_SERVICE = f"{RELEASE}-etcd"
"""The bundled etcd's Service (client port only)."""
ETCD_TLS_SECRET = f"{RELEASE}-etcd-tls"
"""The chart-generated etcd CA and client certificates (``ca.crt``, ``operator.crt``, ``operator.key``, ...)."""
ETCD_READER_SECRET = f"{RELEASE}-etcd-reader"
"""The chart-generated certificate of the etcd user ``ciliary-reader`` (the CLI's: reads, never writes)."""
CLI_ETCD_ITEMS = ("ca.crt", "tls.crt", "tls.key")


class ChartInstallError(RuntimeError):
    """helm failed or the release did not become ready; carries the release and what was seen."""

    def __init__(self, release: str, message: str) -> None:
        super().__init__(f"{release}: {message}")
        self.release = release


def cli_etcd_files(kubectl: Callable[..., subprocess.CompletedProcess[str]], where: Path
                   ) -> tuple[Path, Path, Path] | None:
    """The chart etcd's CA and the ``ciliary-reader`` client certificate and key, read from the chart's Secret
    and written (0600, in a 0700 directory) under ``where``: what the lab's user needs for ``ciliary policy
    trace``/``get`` and ``ciliary observe`` against the chart's etcd, and no key that could write there. Read
    every time (a reinstalled chart makes new ones); None when the Secret or an item cannot be read."""
    out = kubectl("get", "secret", "-n", NAMESPACE, ETCD_READER_SECRET, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    data = (json.loads(out.stdout).get("data") or {})
    try:
        items = {name: base64.b64decode(data[name], validate=True) for name in CLI_ETCD_ITEMS}
    except (KeyError, binascii.Error, ValueError):
        return None
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    where.chmod(0o700)
    for stale in ("operator.crt", "operator.key"):  # the operator's pair, written here before ciliary-reader existed
        (where / stale).unlink(missing_ok=True)
    files = tuple(where / name for name in CLI_ETCD_ITEMS)
    for path in files:
        path.touch(mode=0o600)
        path.chmod(0o600)  # touch leaves an existing file's mode as it was
        path.write_bytes(items[path.name])
    return files[0], files[1], files[2]


def etcd_image_reference() -> str:
    return f"{ETCD_IMAGE_REPOSITORY}:{tools.pinned_versions()['ETCD_VERSION']}"


def etcd_image() -> BuiltImage:
    """The lab control plane's etcd (a static Go binary) as the bundled etcd's image."""
    etcd = tools.built_path("etcd")
    return images.assemble(etcd_image_reference(), None, [
        FileEntry("/usr/local/bin/etcd", source=etcd, mode=0o755),
        FileEntry("/tmp", directory=True, mode=0o1777),
    ], ImageConfig(entrypoint=["/usr/local/bin/etcd"], env={"PATH": images.PATH_ENV}, user="65532:65532"),
        key_parts=[file_digest(etcd)], history=["etcd (built from go.etcd.io/etcd)"])


def memlock_free_kernel(release: str) -> bool:
    """Kernels >= 5.11 account BPF maps to the memory cgroup, not RLIMIT_MEMLOCK."""
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 11)


#: seconds an address learnt from a DNS answer stays allowed at least, on the lab's agents (default: an hour)
LAB_FQDN_MIN_TTL = "1"


@dataclasses.dataclass(frozen=True)
class KubeProxyFree:
    """How a lab without kube-proxy installs the chart (``lab up --real-nodes --kube-proxy-replacement``).

    Nothing translates a ClusterIP before the agents' load balancer is programmed, and it is programmed through
    the operator and etcd: those reach the apiserver at ``api_host:api_port`` (``k8sServiceHost``; in the lab
    the node-local address where the node gateway relays to the apiserver) and etcd at ``etcd_node_ip`` (the
    bundled etcd pinned to ``etcd_node``, its Service's name aliased to that node's address)."""

    api_host: str
    api_port: int
    etcd_node: str
    etcd_node_ip: str


def kube_proxy_free(nodes: Sequence[str]) -> KubeProxyFree:
    """The chart's bootstrap addresses in a lab without kube-proxy: the apiserver through the node gateway's
    relay on ``NODE_SERVICES_IP`` (local to every node namespace), etcd pinned to the first node. Pure."""
    first = sorted(nodes, key=node_index)[0]
    return KubeProxyFree(api_host=NODE_SERVICES_IP, api_port=443, etcd_node=first, etcd_node_ip=node_ip(node_index(first)))


def lab_values(*, sys_resource: bool = True, cgroup_prefix: str = "",
               kube_proxy_free: KubeProxyFree | None = None, load_balancing: bool = True,
               pod_netns: tuple[str, str] | None = None) -> dict[str, Any]:
    """``sys_resource``: whether this machine's root may grant CAP_SYS_RESOURCE (``nodehost.detect_host``);
    ``cgroup_prefix``: the nodes' cgroup roots are ``<prefix><node>`` (the socket load balancer of each node
    attaches there, never to the machine's root cgroup, which every lab node and the machine share);
    ``kube_proxy_free``: no kube-proxy runs, Ciliary's load balancer serves every Service (socket level and
    north-south on the nodes' devices, kube-proxy's health ports); ``load_balancing`` False: the peer lab
    (``--kube-proxy``), kube-proxy alone serves Services: no load-balancing program in any agent, no Service
    intent from the operator; ``pod_netns``: where the nodes' runtimes keep pods' network namespaces (the host
    directory and a node's sub-path, ``kubeletnode.pod_netns_mount``). Pure."""
    if kube_proxy_free and not load_balancing:
        raise ChartInstallError(RELEASE, "without kube-proxy and without Ciliary's load balancer nothing serves "
                                "Services")
    agent: dict[str, Any] = {} if sys_resource else {"sysResource": False}
    # as Lab.start_agent's agents: a DNS answer's TTL decides how long its addresses stay allowed
    agent["extraEnv"] = [{"name": "CILIARY_AGENT_FQDN_MIN_TTL", "value": LAB_FQDN_MIN_TTL}]
    if cgroup_prefix and load_balancing:
        agent["loadBalancing"] = {"cgroupPath": f"{cgroup_prefix}$(CILIARY_AGENT_NODE_NAME)"}
        if kube_proxy_free:
            agent["loadBalancing"] |= {"devices": "auto", "proxyHealthzAddr": "0.0.0.0:10256",
                                       "proxyStatusAddr": "127.0.0.1:10249"}
    elif kube_proxy_free:
        raise ChartInstallError(RELEASE, "without kube-proxy the agents' load balancer needs the nodes' cgroups")
    else:
        agent["loadBalancing"] = {"enabled": False}
    if pod_netns:
        agent["podNetnsDir"], agent["podNetnsSubdir"] = pod_netns
    etcd: dict[str, Any] = {"image": etcd_image_reference(), "persistence": {"enabled": False}}
    values: dict[str, Any] = {"etcd": etcd, "agent": agent}
    if not load_balancing:
        values["operator"] = {"loadBalancing": False}
    if kube_proxy_free:
        etcd["nodeSelector"] = {"kubernetes.io/os": "linux", "kubernetes.io/hostname": kube_proxy_free.etcd_node}
        etcd["clientHostAlias"] = kube_proxy_free.etcd_node_ip
        values |= {"k8sServiceHost": kube_proxy_free.api_host, "k8sServicePort": kube_proxy_free.api_port}
    return values


def node_cgroup_prefix(prefix: str) -> str:
    """Where the lab's node cgroup roots (``kubeletnode``: ``/ciliary-<prefix>-<node>``) sit, relative to
    /sys/fs/cgroup in cgroup2 (``unified/`` on hybrid hosts)."""
    unified = nodehost.cgroup_layout().unified
    below = unified.relative_to("/sys/fs/cgroup").as_posix() + "/" if unified and unified != Path("/sys/fs/cgroup") \
        else ""
    return f"{below}ciliary-{prefix}-"


def helm(helm_bin: Path, kubeconfig: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_bin), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True,
                          timeout=timeout)


def install(root: Path, kubeconfig: Path, state_dir: Path, *, extra_values: dict[str, Any] | None = None,
            cgroup_prefix: str = "", kube_proxy_free: KubeProxyFree | None = None,
            load_balancing: bool = True, pod_netns: tuple[str, str] | None = None) -> None:
    """``helm upgrade --install`` both charts (idempotent: a second ``lab up`` upgrades in place)."""
    helm_bin = tools.built_path("helm")
    values = state_dir / "chart-values.yaml"
    host = nodehost.detect_host()
    if host.restrict_oom_score_adj and not memlock_free_kernel(platform.release()):
        raise ChartInstallError(RELEASE, f"root lacks CAP_SYS_RESOURCE and kernel {platform.release()} (< 5.11) "
                                "charges BPF maps to RLIMIT_MEMLOCK: the agent cannot run here")
    values.write_text(yaml.safe_dump({**lab_values(sys_resource=not host.restrict_oom_score_adj,
                                                   cgroup_prefix=cgroup_prefix, kube_proxy_free=kube_proxy_free,
                                                   load_balancing=load_balancing, pod_netns=pod_netns),
                                      **(extra_values or {})}, sort_keys=False))
    for release, chart, extra in ((CRDS_RELEASE, root / "charts" / "ciliary-crds", []),
                                  (RELEASE, root / "charts" / "ciliary", ["-f", str(values)])):
        done = helm(helm_bin, kubeconfig, "upgrade", "--install", release, str(chart), "-n", NAMESPACE, *extra)
        if done.returncode != 0:
            raise ChartInstallError(release, f"helm upgrade --install failed: {done.stderr.strip()[-3000:]}")


def uninstall(kubeconfig: Path) -> None:
    helm_bin = tools.built_path("helm")
    for release in (RELEASE, CRDS_RELEASE):
        done = helm(helm_bin, kubeconfig, "uninstall", release, "-n", NAMESPACE, "--wait", "--ignore-not-found")
        if done.returncode != 0:
            raise ChartInstallError(release, f"helm uninstall failed: {done.stderr.strip()[-3000:]}")


def workload_ready(obj: dict[str, Any]) -> bool:
    """A DaemonSet, Deployment or StatefulSet whose current generation has every replica ready."""
    status, kind = obj.get("status", {}), obj.get("kind")
    if status.get("observedGeneration", 0) < obj["metadata"].get("generation", 1):
        return False
    if kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        return bool(want) and status.get("numberReady", 0) == want and status.get("updatedNumberScheduled") == want
    want = obj.get("spec", {}).get("replicas", 1)
    return status.get("readyReplicas", 0) == want and status.get("updatedReplicas", 0) == want


def workloads(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> list[dict[str, Any]]:
    out = kubectl("get", "daemonsets,deployments,statefulsets", "-n", NAMESPACE, "-l",
                  f"app.kubernetes.io/instance={RELEASE}", "-o", "json", check=False)
    return list(json.loads(out.stdout).get("items", [])) if out.returncode == 0 else []


def wait_ready(kubectl: Callable[..., subprocess.CompletedProcess[str]], nodes: Sequence[str], seconds: float,
               *, say: Callable[[str], None] = lambda _: None) -> None:
    """Agents Ready on every node in ``nodes``, the operator and etcd Ready (bounded)."""
    deadline = time.monotonic() + seconds
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = workloads(kubectl)
        kinds = {o["kind"] for o in seen}
        daemonsets = [o for o in seen if o["kind"] == "DaemonSet"]
        if {"DaemonSet", "Deployment", "StatefulSet"} <= kinds and all(workload_ready(o) for o in seen) and all(
                o["status"].get("numberReady", 0) >= len(nodes) for o in daemonsets):
            return
        time.sleep(1)
    pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
    raise ChartInstallError(RELEASE, f"not ready after {seconds:.0f} s:\n{pods}\n"
                            + "\n".join(f"{o['kind']} {o['metadata']['name']}: {o.get('status')}" for o in seen))
