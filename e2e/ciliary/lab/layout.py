"""Where everything of one lab lives: state directory, names, addresses, binaries.

A lab is identified by its state directory (``.lab/`` under the current directory
unless ``CILIARY_LAB_DIR`` says otherwise) and a short name prefix (``cy`` unless
``CILIARY_LAB_PREFIX`` says otherwise) used for every kernel object it creates:
network namespaces, the cgroup subtree and the bpffs directory. Two labs with
different prefixes can run side by side (the test suite uses its own).

Addressing (all of it lives only inside namespaces the lab creates):
- underlay 192.0.2.0/24 on a bridge inside ``<prefix>-underlay``;
- node-i: 192.0.2.(10+i) on eth0 of ``<prefix>-node-i``, pod CIDR 10.244.i.0/24;
- the world host: 192.0.2.100 in ``<prefix>-world``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import tools

UNDERLAY = ipaddress.IPv4Network("192.0.2.0/24")
WORLD_IP = "192.0.2.100"
WORLD_DNS_IP = "192.0.2.53"
"""The world host's second address: its DNS server (``ciliary.lab.worlddns``), UDP and TCP 53."""
LB_IP_POOL = "203.0.113.128/26"
"""The real-node lab's CiliumLoadBalancerIPPool (``lab-pool``): LB IPAM gives LoadBalancer Services their IPs
from it; the world host routes it to the nodes (ECMP over ports, so connections spread over the nodes), as
a router peering with them would."""
WORLD_TCP_PORTS = (80, 443, 8080)
WORLD_UDP_PORTS = (53,)
CONTROL_PLANE_TOOLS = ("etcd", "etcdctl", "kube-apiserver", "kube-controller-manager", "kubectl")


@dataclass(frozen=True)
class Binaries:
    """The control-plane executables the set-up built, at the versions ``setup/versions.env`` pins.

    Resolved by :mod:`ciliary.lab.tools` (the one place that knows where tools live).
    """

    etcd: Path
    etcdctl: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    @classmethod
    def discover(cls) -> Binaries:
        versions = tools.pinned_versions()
        return cls(**{name.replace("-", "_"): tools.built_path(name, versions) for name in CONTROL_PLANE_TOOLS})

    def missing(self) -> list[Path]:
        return [p for p in vars(self).values() if not os.access(p, os.X_OK)]


@dataclass(frozen=True)
class LabLayout:
    """Names and paths of one lab."""

    state_dir: Path
    prefix: str

    @classmethod
    def from_env(cls) -> LabLayout:
        state = Path(os.environ.get("CILIARY_LAB_DIR", Path.cwd() / ".lab")).resolve()
        prefix = os.environ.get("CILIARY_LAB_PREFIX", "cy")
        if not prefix.isalnum() or len(prefix) > 6:
            raise ValueError(f"CILIARY_LAB_PREFIX {prefix!r} must be 1-6 letters or digits")
        return cls(state_dir=state, prefix=prefix)

    # --- files ---------------------------------------------------------------
    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "lab.json"

    def node_dir(self, node: str) -> Path:
        return self.state_dir / "nodes" / node

    def agent_socket(self, node: str) -> Path:
        # unix socket paths are limited to 107 bytes: keep them short and out of deep trees
        return Path("/run/ciliary") / self.prefix / node / "agent.sock"

    # --- kernel objects ---------------------------------------------------------
    @property
    def underlay_netns(self) -> str:
        return f"{self.prefix}-underlay"

    @property
    def world_netns(self) -> str:
        return f"{self.prefix}-world"

    def node_netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def owns_netns(self, name: str) -> bool:
        return name.startswith(f"{self.prefix}-")

    @property
    def bpffs_dir(self) -> Path:
        return Path("/sys/fs/bpf/ciliary") / self.prefix

    @property
    def cgroup_name(self) -> str:
        return f"ciliary-{self.prefix}"


def node_name(index: int) -> str:
    return f"node-{index}"


def node_index(name: str) -> int:
    if not name.startswith("node-") or not name[5:].isdigit():
        raise ValueError(f"{name!r} is not a lab node name")
    return int(name[5:])


def node_ip(index: int) -> str:
    return str(UNDERLAY.network_address + 10 + index)


def pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"
