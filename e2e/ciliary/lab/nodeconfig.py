"""Configuration files of a real lab node (containerd + kubelet), rendered from its paths. Pure.

A real node is a lab network namespace running its own containerd and kubelet. Everything the two
would share on a normal host is made per node here (see ``NodePaths``): containerd root, state,
socket, runc root, CNI directories and IPAM store; kubelet root, certificate and pod-log
directories and cgroup root. NRI is off (its socket path is machine-wide).

Settings that follow from the machine rather than the node (``Host``) are detected by
``ciliary.lab.nodehost`` and passed in: the cgroup driver (cgroupfs unless PID 1 is systemd),
whether the cgroup layout is v1 (kubelet must be told ``failCgroupV1: false``), and whether root
may lower oom_score_adj (without CAP_SYS_RESOURCE runc fails unless containerd restricts it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: the sandbox ("pause") image every pod starts with; the lab imports its own under this name
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.1"
CNI_VERSION = "1.0.0"
CNI_NETWORK = "ciliary"
#: where the kubelet of every node finds the apiserver: a relay inside the node's namespace
APISERVER_RELAY_PORT = 6443
#: the cluster DNS Service's ClusterIP (service CIDR 10.96.0.0/16; ``kubernetes`` is 10.96.0.1)
CLUSTER_DNS_IP = "10.96.0.10"
#: chart mode: the one endpoint of the ``kubernetes`` (port 443) and ``kube-dns`` (port 53) Services, a
#: local address of every node namespace (TEST-NET-2) where the gateway relays to the apiserver and the
#: node's CoreDNS answers (``ciliary.lab.nodeservices``)
NODE_SERVICES_IP = "198.51.100.1"
#: host directories a chart-mode node sees as its own: an overlay on the host's, writes kept in the
#: node's state (the chart's hostPaths /etc/cni/net.d, /opt/cni/bin, /opt/ciliary, /var/lib/ciliary,
#: /var/lib/cni land there, never on the host)
OVERLAID_HOST_DIRS = ("/etc", "/opt", "/var/lib")
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248


@dataclass(frozen=True)
class Host:
    """What the machine needs, as detected (never assumed)."""

    cgroup_driver: str  # "cgroupfs" or "systemd"
    cgroup_v1: bool  # v1 or hybrid: kubelet refuses v1 unless failCgroupV1 is false
    restrict_oom_score_adj: bool  # True when root lacks CAP_SYS_RESOURCE


@dataclass(frozen=True)
class NodePaths:
    """Every per-node path; ``state`` on disk, ``run`` short (unix socket paths are ≤ 107 bytes)."""

    node: str
    state: Path  # <lab>/nodes/<node>
    run: Path  # /run/ciliary/<prefix>/<node>
    cgroup_root: str  # /ciliary-<prefix>-<node>, the same path in every cgroup hierarchy

    @property
    def containerd_root(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.state / "containerd.toml"

    @property
    def runc_root(self) -> Path:
        return self.run / "runc"

    @property
    def cni_bin_dir(self) -> Path:
        return self.state / "cni" / "bin"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.state / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    @property
    def kubelet_cert_dir(self) -> Path:
        return self.state / "kubelet-pki"

    @property
    def kubelet_config(self) -> Path:
        return self.state / "kubelet.yaml"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.state / "kubelet.kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.state / "pod-logs"

    @property
    def registry_hosts_dir(self) -> Path:
        return self.state / "registry-hosts"

    @property
    def resolv_conf(self) -> Path:
        return self.state / "resolv.conf"

    @property
    def host_dir(self) -> Path:
        """Upper and work directories of the overlays, and the node's own /run/ciliary (chart mode)."""
        return self.state / "host"


def private_mounts_script(paths: NodePaths) -> str:
    """Shell run in a chart-mode node's new mount namespace (propagation slave) before containerd starts.

    The node gets its own /etc, /opt and /var/lib (overlays whose writes stay in the node's state), its
    CNI directories bound onto /opt/cni/bin and /etc/cni/net.d (where the chart's install-cni writes and
    containerd reads), its own /run/ciliary (agent socket) and its own bpffs instance on /sys/fs/bpf,
    made shared so the agent pod's Bidirectional mount check passes. Everything disappears with the
    namespace when the node's last process exits.
    """
    lines = ["set -e"]
    for host_dir in OVERLAID_HOST_DIRS:
        base = paths.host_dir / host_dir.strip("/").replace("/", "-")
        lines += [f"mkdir -p {base}/upper {base}/work",
                  f"mount -t overlay overlay -o lowerdir={host_dir},upperdir={base}/upper,workdir={base}/work "
                  f"{host_dir}"]
    run_ciliary = paths.host_dir / "run-ciliary"
    lines += [f"mkdir -p /opt/cni/bin /etc/cni/net.d /run/ciliary {run_ciliary} {paths.cni_bin_dir} "
              f"{paths.cni_conf_dir}",
              f"mount --bind {paths.cni_bin_dir} /opt/cni/bin",
              f"mount --bind {paths.cni_conf_dir} /etc/cni/net.d",
              f"mount --bind {run_ciliary} /run/ciliary",
              # the host's bpffs leaves this namespace only (slave: nothing propagates back); a runtime checks
              # the first /sys/fs/bpf entry of mountinfo for sharing, so the node's own must not sit on top
              "if mountpoint -q /sys/fs/bpf; then umount /sys/fs/bpf; fi",
              "mount -t bpf bpf /sys/fs/bpf",
              "mount --make-shared /sys/fs/bpf",
              'exec "$@"']
    return "\n".join(lines) + "\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for the characters we use
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {value!r}")


def render_toml(document: dict[str, Any]) -> str:
    """A small TOML writer for nested tables of scalars and lists (all containerd's config needs)."""
    lines: list[str] = []

    def table(prefix: list[str], body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append("[" + ".".join(p if _BARE_KEY.fullmatch(p) else f"'{p}'" for p in prefix) + "]")
        for key, value in scalars.items():
            lines.append(f"{key if _BARE_KEY.fullmatch(key) else repr(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            table([*prefix, key], value)

    table([], document)
    return "\n".join(lines) + "\n"


def containerd_config(paths: NodePaths, host: Host) -> dict[str, Any]:
    """containerd 2.x (config version 3) for one node."""
    return {
        "version": 3,
        "root": str(paths.containerd_root),
        "state": str(paths.containerd_state),
        "grpc": {"address": str(paths.containerd_socket)},
        "plugins": {
            "io.containerd.cri.v1.images": {
                "snapshotter": "overlayfs",
                "pinned_images": {"sandbox": SANDBOX_IMAGE},
                "registry": {"config_path": str(paths.registry_hosts_dir)},
            },
            "io.containerd.cri.v1.runtime": {
                "restrict_oom_score_adj": host.restrict_oom_score_adj,
                "netns_mounts_under_state_dir": True,
                "enable_cdi": False,
                "containerd": {
                    "default_runtime_name": "runc",
                    "runtimes": {"runc": {
                        "runtime_type": "io.containerd.runc.v2",
                        "options": {"Root": str(paths.runc_root),
                                    "SystemdCgroup": host.cgroup_driver == "systemd"},
                    }},
                },
                "cni": {
                    "bin_dirs": [str(paths.cni_bin_dir)],
                    "conf_dir": str(paths.cni_conf_dir),
                    "max_conf_num": 1,
                    "use_internal_loopback": True,
                },
            },
            "io.containerd.grpc.v1.cri": {"stream_server_address": "127.0.0.1", "stream_server_port": "0"},
            "io.containerd.nri.v1.nri": {"disable": True},
            "io.containerd.internal.v1.opt": {"path": str(paths.state / "containerd-opt")},
        },
    }


def registry_config(storage: Path, port: int) -> dict[str, Any]:
    """distribution's configuration for the lab registry (loopback only, plain HTTP)."""
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }


def registry_hosts(port: int) -> tuple[str, str]:
    """(directory name, hosts.toml) telling containerd to pull ``localhost:<port>/...`` over HTTP."""
    host = f"localhost:{port}"
    return host, render_toml({"server": f"http://{host}", "host": {f"http://{host}": {
        "capabilities": ["pull", "resolve", "push"]}}})


def cni_conflist(paths: NodePaths, pod_cidr: str, agent_socket: Path) -> dict[str, Any]:
    """The node's CNI network: ``ciliary-cni`` with the node's pod CIDR, IPAM store and agent socket."""
    return {
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "ciliary-cni",
            "mtu": 1500,
            "ipam": {"type": "host-local-ciliary", "subnet": pod_cidr, "dataDir": str(paths.ipam_dir)},
            "agentSocket": str(agent_socket),
        }],
    }


def kubelet_config(paths: NodePaths, host: Host, *, client_ca: Path, cluster_dns: str | None = None) -> dict[str, Any]:
    """KubeletConfiguration for one node (flags that have no config field are in ``kubelet_argv``)."""
    return {
        **({"clusterDNS": [cluster_dns]} if cluster_dns else {}),
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": KUBELET_HEALTHZ_PORT,
        # callers prove who they are (a client certificate of the lab CA, or a bearer token the apiserver
        # reviews) and the apiserver decides what they may do (SubjectAccessReview per request, as on
        # kubeadm clusters); anonymous requests are refused
        "authentication": {"x509": {"clientCAFile": str(client_ca)}, "anonymous": {"enabled": False},
                           "webhook": {"enabled": True, "cacheTTL": "30s"}},
        "authorization": {"mode": "Webhook", "webhook": {"cacheAuthorizedTTL": "30s",
                                                         "cacheUnauthorizedTTL": "5s"}},
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "cgroupDriver": host.cgroup_driver,
        "cgroupRoot": paths.cgroup_root,
        "cgroupsPerQOS": True,
        "failCgroupV1": not host.cgroup_v1,
        "failSwapOn": False,
        "podLogsDir": str(paths.pod_logs),
        "resolvConf": str(paths.resolv_conf),
        "clusterDomain": "cluster.local",
        "registerNode": True,
        # the lab shares one disk and one machine between nodes: no image GC of imported images,
        # no evictions triggered by what other nodes use
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "enableServer": True,
        "logging": {"format": "text"},
    }


def kubelet_argv(binary: Path, paths: NodePaths, node_ip: str) -> list[str]:
    return [
        str(binary), f"--config={paths.kubelet_config}", f"--kubeconfig={paths.kubelet_kubeconfig}",
        f"--root-dir={paths.kubelet_root}", f"--cert-dir={paths.kubelet_cert_dir}",
        f"--hostname-override={paths.node}", f"--node-ip={node_ip}", "--v=1",
    ]


def egress_selector_config(uds: Path) -> dict[str, Any]:
    """The apiserver reaches kubelets (exec, logs, port-forward) through an HTTP CONNECT proxy on ``uds``."""
    return {
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [{"name": "cluster", "connection": {
            "proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(uds)}}}}],
    }


def dump_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)
