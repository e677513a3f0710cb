"""``ciliary lab``: one lab's state and the parts every lab shares; show it, run commands in it, take it down.

``ciliary.lab.reallab`` brings a lab up (real kubelets and containerd per node); ``Lab`` holds what it
builds on: the lab's configuration (``lab.json``), ports and nodes, the CRDs, the Node objects, the
world host, a node's Ciliary agent as a process (real nodes without the chart), and ``ciliary lab
status``, ``env`` and ``exec``. ``down`` removes everything a lab created, also after an ``up`` that
crashed half way, and also a lab of the removed process lab: processes, cgroups, network namespaces
(and with them every veth and the bridge), bpffs pins, sockets, real nodes' mounts, and the state directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import cgroups, controlplane, etcdsecurity, kubeletnode, processes, tools, topology
from ciliary.lab.layout import (
    WORLD_DNS_IP,
    WORLD_IP,
    WORLD_TCP_PORTS,
    WORLD_UDP_PORTS,
    Binaries,
    LabLayout,
    node_index,
    node_name,
    pod_cidr,
)
from ciliary.operator.store import access


def mode_of(config: dict[str, object]) -> str:
    """How the lab proxies Services, as ``lab status`` and ``lab env`` (``CILIARY_LAB_SERVICES``) say it. Pure."""
    if config.get("kube_proxy"):  # the peer: kube-proxy alone, Ciliary's load balancer off
        return f"kube-proxy-{config['kube_proxy']}"
    if config.get("kube_proxy_replacement"):
        return "kube-proxy-replacement"
    return "kube-proxy"  # beside Ciliary's socket load balancer


PROCESS_LAB_GONE = ("this state directory holds a process lab (`ciliary lab up --process`), which was removed "
                    "from Ciliary: `ciliary lab down` takes it down, then `ciliary lab up` brings up real nodes")
"""What ``lab up`` says to a lab the old process lab left running (its ``lab.json`` has nodes, no ``real_nodes``)."""


def is_process_lab(config: dict[str, object]) -> bool:
    """A ``lab.json`` the removed process lab wrote: nodes, but not real ones. Pure."""
    return bool(config.get("nodes")) and not config.get("real_nodes")


class LabError(RuntimeError):
    """Something the user must fix before the lab can work (message says what)."""


@dataclass
class Lab:
    layout: LabLayout
    bins: Binaries

    @classmethod
    def from_env(cls) -> Lab:
        return cls(LabLayout.from_env(), Binaries.discover())

    # --- helpers -----------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return controlplane.kubectl(self.layout, self.bins, *args, input=input, check=check)

    def ports(self) -> controlplane.Ports:
        return controlplane.load_or_choose_ports(self.layout)

    def config(self) -> dict[str, object]:
        try:
            data = json.loads(self.layout.config_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def node_names(self) -> list[str]:
        config = self.config()
        count = int(str(config.get("nodes", 0)))
        return [node_name(i) for i in range(1, count + 1)]

    def etcd_certs(self) -> etcdsecurity.EtcdPKI:
        return etcdsecurity.etcd_pki(self.layout.pki_dir)

    def etcd_flags(self, user: str) -> list[str]:
        """``--etcd-*-file`` flags that make a component etcd user ``user``."""
        tls = self.etcd_certs().client(user)
        return ["--etcd-ca-file", str(tls.ca_file), "--etcd-cert-file", str(tls.cert_file),
                "--etcd-key-file", str(tls.key_file)]

    def bin(self, name: str) -> str:
        local = Path(sys.executable).parent / name
        return str(local) if local.exists() else (shutil.which(name) or name)

    def child_env(self) -> dict[str, str]:
        return {"CILIARY_LAB_DIR": str(self.layout.state_dir), "CILIARY_LAB_PREFIX": self.layout.prefix,
                "PYTHONUNBUFFERED": "1"}

    def crds_dir(self) -> Path | None:
        env = os.environ.get("CILIARY_CRDS_DIR")
        if env:
            return Path(env)
        for base in [Path.cwd(), *Path.cwd().parents]:
            if (base / "crds").is_dir() and (base / "pyproject.toml").exists():
                return base / "crds"
        return None

    def install_crds(self) -> None:
        """Apply crds/*.yaml (server-side: the schemas exceed the client-side annotation limit) and wait."""
        crds = self.crds_dir()
        files = sorted(crds.glob("*.yaml")) if crds else []
        if not files:
            return
        names = []
        for f in files:
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
            names.append("crd/" + f.name.removesuffix(".yaml"))
        deadline = time.monotonic() + 60
        while True:  # right after creation a CRD may have no status yet and `kubectl wait` fails at once
            done = self.kubectl("wait", "--for=condition=Established", "--timeout=30s", *names, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"CRDs not established: {done.stderr.strip()}")
            time.sleep(0.5)

    def create_nodes(self, names: Sequence[str]) -> None:
        items = []
        for node in names:
            i = node_index(node)
            items.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "ciliary.io/lab": "true"}},
                "spec": {"podCIDR": pod_cidr(i), "podCIDRs": [pod_cidr(i)]}})
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def start_world(self) -> None:
        world_ns = f"--net={topology.NETNS_DIR / self.layout.world_netns}"
        if not processes.running_pid(self.layout, "world-dns"):
            processes.spawn(self.layout, "world-dns", ["nsenter", world_ns, sys.executable, "-m",
                                                       "ciliary.lab.worlddns", "--address", WORLD_DNS_IP],
                            env=self.child_env())
        if processes.running_pid(self.layout, "world"):
            return
        # bound to WORLD_IP only: the DNS server owns port 53 of the world's second address
        argv = ["nsenter", world_ns, sys.executable, "-m",
                "ciliary.lab.podserver", "--name", "world", "--bind", WORLD_IP]
        for p in WORLD_TCP_PORTS:
            argv += ["--tcp", str(p)]
        for p in WORLD_UDP_PORTS:
            argv += ["--udp", str(p)]
        processes.spawn(self.layout, "world", argv, env=self.child_env())

    def start_agent(self, node: str, ports: controlplane.Ports) -> None:
        """The node's Ciliary agent as a lab process (real nodes without the chart: the kubelet runs the pods)."""
        state = self.layout.node_dir(node)
        state.mkdir(parents=True, exist_ok=True)
        self.layout.agent_socket(node).parent.mkdir(parents=True, exist_ok=True)
        agent = f"agent-{node}"
        if not processes.running_pid(self.layout, agent):
            health = self.health_port(node)
            etcdsecurity.add_node(ports.etcd_endpoint, self.etcd_certs(), node)
            processes.spawn(self.layout, agent, [
                self.bin("ciliary-agent"), "--node", node, "--etcd-endpoints", ports.etcd_endpoint,
                *self.etcd_flags(access.node_user(node)),
                "--socket", str(self.layout.agent_socket(node)), "--state-dir", str(state / "agent"),
                "--health-addr", f"127.0.0.1:{health}",
                "--lb-cgroup", str(cgroups.ensure(cgroups.lab_root(self.layout.cgroup_name) / node)),
                "--hubble-addr", f"127.0.0.1:{self.hubble_port(node)}",
                # the lab's TTLs are the world DNS server's (seconds), so expiry is observable
                "--fqdn-min-ttl", "1",
                *(["--direct-status", "on", "--kubeconfig", str(self.layout.state_dir / "runtime.kubeconfig")]
                  if self.direct_status() else []),
            ], env={**self.child_env(), "CILIARY_AGENT_NETNS": self.layout.node_netns(node),
                    "CILIARY_AGENT_BPFFS_DIR": str(self.layout.bpffs_dir / node)})

    def health_port(self, node: str) -> int:
        return self._saved_port(self.layout.node_dir(node) / "health-port")

    def hubble_port(self, node: str) -> int:
        """The port of the node agent's Hubble Observer API (gRPC)."""
        return self._saved_port(self.layout.node_dir(node) / "hubble-port")

    def relay_port(self) -> int:
        """This shell's port for the chart's ``hubble-relay`` Service, the cluster's one Hubble address
        (``HUBBLE_SERVER``; ``reallab.start_service_forward``)."""
        return self._saved_port(self.layout.state_dir / "relay-port")

    @staticmethod
    def _saved_port(path: Path) -> int:
        if path.exists():
            return int(path.read_text())
        path.parent.mkdir(parents=True, exist_ok=True)
        port = controlplane.free_port()
        path.write_text(str(port))
        return port

    def ui_port(self) -> int:
        """This shell's port for the chart's ``hubble-ui`` Service, the service map (``CILIARY_UI_URL``)."""
        return self._saved_port(self.layout.state_dir / "ui-port")

    def etcd_forward_port(self) -> int:
        """The root-namespace port forwarded to the chart's etcd Service (``CILIARY_ETCD_ENDPOINTS``)."""
        return self._saved_port(self.layout.state_dir / "etcd-forward-port")

    def direct_status(self) -> bool:
        """CILIARY_LAB_STATUS_MODE=direct: agents started by :meth:`start_agent` patch policy status themselves."""
        return os.environ.get("CILIARY_LAB_STATUS_MODE", "handover") == "direct"

    # --- down --------------------------------------------------------------
    def down(self, *, log: bool = True) -> None:
        say = print if log else (lambda *a, **k: None)
        for node in kubeletnode.teardown_all(self.layout):  # real nodes first: their mounts live in state_dir
            say(f"lab: removed real node {node}")
        # a lab of the removed process lab: its scheduler and pod runtimes first (no pod started meanwhile)
        order = ["scheduler"] + [n for n in processes.names(self.layout) if n.startswith("runtime-")]
        order += [n for n in processes.names(self.layout) if n not in order and n not in
                  ("kube-controller-manager", "kube-apiserver", "etcd")]
        order += ["kube-controller-manager", "kube-apiserver", "etcd"]
        for name in order:
            if processes.stop(self.layout, name):
                say(f"lab: stopped {name}")
        cgroups.remove_tree(cgroups.lab_root(self.layout.cgroup_name))
        for ns in topology.remove_all(self.layout):
            say(f"lab: removed network namespace {ns}")
        for path in (self.layout.bpffs_dir, Path("/run/ciliary") / self.layout.prefix,
                     kubeletnode.RUN_ROOT / self.layout.prefix):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
        if self.layout.state_dir.exists():
            shutil.rmtree(self.layout.state_dir, ignore_errors=True)
        say("lab: down")

    # --- env, status, exec -------------------------------------------------
    def env_lines(self) -> list[str]:
        ports = self.ports()
        root = self.etcd_certs().client(access.ROOT_USER)  # the lab's etcd administrator
        return [f"export KUBECONFIG={self.layout.kubeconfig}",
                f"export ETCDCTL_ENDPOINTS={ports.etcd_endpoint}",
                f"export ETCDCTL_CACERT={root.ca_file}",
                f"export ETCDCTL_CERT={root.cert_file}",
                f"export ETCDCTL_KEY={root.key_file}",
                f"export LAB_WORLD_IP={WORLD_IP}",
                f"export CILIARY_LAB_SERVICES={mode_of(self.config())}",
                f"export LAB_WORLD_DNS_IP={WORLD_DNS_IP}",
                # the relay and the service map: the chart's Services, forwarded by ciliary.lab.serviceforward
                *([f"export HUBBLE_SERVER=127.0.0.1:{self.relay_port()}",
                   f"export CILIARY_UI_URL=http://127.0.0.1:{self.ui_port()}"]
                  if processes.running_pid(self.layout, "service-forward") else []),
                f"export PATH={Path(sys.executable).parent}:{self.bins.kubectl.parent}:{self.bins.etcdctl.parent}:"
                f"{tools.built_path('hubble').parent}:{tools.built_path('helm').parent}:"
                # skaffold when built (setup/build-node-tools.sh skaffold; make test builds it)
                f"{f'{skaffold.parent}:' if (skaffold := tools.built_path('skaffold')).exists() else ''}$PATH",
                *self.chart_cli_env_lines(), *self.real_node_env_lines()]

    def env(self) -> dict[str, str]:
        """What ``eval $(ciliary lab env)`` sets, as a dict (``$PATH`` expanded from this process's)."""
        out = {}
        for line in self.env_lines():
            key, _, value = line.removeprefix("export ").partition("=")
            if len(value) > 1 and value[0] == value[-1] == "'":  # quoted for the shell: taken literally
                out[key] = value[1:-1]
                continue
            out[key] = value.replace("$PATH", os.environ.get("PATH", ""))
        return out

    def chart_cli_env_lines(self) -> list[str]:
        """The CLI's way to the chart's etcd (the service forward's port, the ``ciliary-reader``
        certificate from the chart's Secret) and to the agents (kubectl exec: ``ciliary.cli.agent_access``)."""
        port = self.layout.state_dir / "etcd-forward-port"
        if not port.exists() or not processes.running_pid(self.layout, "service-forward"):
            return []
        from ciliary.lab import chartinstall  # it imports the image builders: only when a chart runs

        files = chartinstall.cli_etcd_files(lambda *a, **k: self.kubectl(*a, **k), self.layout.state_dir / "cli-etcd")
        if files is None:
            return []
        ca, cert, key = files
        return [f"export CILIARY_ETCD_ENDPOINTS=https://127.0.0.1:{port.read_text().strip()}",
                f"export CILIARY_ETCD_CA_FILE={ca}", f"export CILIARY_ETCD_CERT_FILE={cert}",
                f"export CILIARY_ETCD_KEY_FILE={key}", f"export CILIARY_KUBECTL={self.bins.kubectl}"]

    def real_node_env_lines(self) -> list[str]:
        """For ``skaffold run -p lab``: the lab registry as default repository, and the agent capability."""
        registry = self.layout.state_dir / "registry-port"
        if not registry.exists():
            return []
        values = self.layout.state_dir / "chart-values.yaml"
        sys_resource = "false" if values.exists() and "sysResource: false" in values.read_text() else "true"
        from ciliary.lab import chartinstall  # it imports the image builders: only when a lab runs

        lines = [f"export SKAFFOLD_DEFAULT_REPO=localhost:{registry.read_text().strip()}",
                 f"export CILIARY_LAB_SYS_RESOURCE={sys_resource}",
                 f"export CILIARY_LAB_ETCD_IMAGE={chartinstall.etcd_image_reference()}"]
        # skaffold.yaml's lab profile: the load balancer `lab up` installs the chart with, on each node's cgroup
        peer = bool(self.config().get("kube_proxy"))  # kube-proxy alone: Ciliary's load balancer off everywhere
        lines += [f"export CILIARY_LAB_LB_ENABLED={'false' if peer else 'true'}",
                  f"export CILIARY_LAB_OPERATOR_LB={'false' if peer else 'true'}",
                  f"export CILIARY_LAB_LB_CGROUP_PREFIX={chartinstall.node_cgroup_prefix(self.layout.prefix)}"]
        netns_dir, netns_subpath = kubeletnode.pod_netns_mount(self.layout)  # each node's pods' namespaces
        lines += [f"export CILIARY_LAB_POD_NETNS_DIR={netns_dir}",
                  f"export CILIARY_LAB_POD_NETNS_SUBDIR='{netns_subpath}'"]
        if self.config().get("kube_proxy_replacement") and self.node_names():
            # and without kube-proxy: north-south, kube-proxy's health ports, the bootstrap addresses
            free = chartinstall.kube_proxy_free(self.node_names())
            lb = chartinstall.lab_values(cgroup_prefix=chartinstall.node_cgroup_prefix(self.layout.prefix),
                                         kube_proxy_free=free)["agent"]["loadBalancing"]
            lines += [f"export CILIARY_LAB_LB_DEVICES={lb['devices']}",
                      f"export CILIARY_LAB_PROXY_HEALTHZ_ADDR={lb['proxyHealthzAddr']}",
                      f"export CILIARY_LAB_PROXY_STATUS_ADDR={lb['proxyStatusAddr']}",
                      f"export CILIARY_LAB_K8S_SERVICE_HOST={free.api_host}",
                      f"export CILIARY_LAB_ETCD_HOST_ALIAS={free.etcd_node_ip}",
                      f"export CILIARY_LAB_ETCD_NODE={free.etcd_node}"]
        return lines

    def status(self) -> str:
        lines = [f"lab {self.layout.prefix} in {self.layout.state_dir}"]
        if not self.layout.config_file.exists():
            return lines[0] + ": not up (run `ciliary lab up`)"
        if is_process_lab(self.config()):
            lines.append("a lab of the removed process lab: `ciliary lab down` removes it")
        else:
            lines.append(f"Services: {mode_of(self.config())}")
        lines.append("\nPROCESS                      PID      RSS")
        for name in processes.names(self.layout):
            pid = processes.running_pid(self.layout, name)
            rss = f"{processes.rss_kib(pid) / 1024:.0f} MiB" if pid else "-"
            lines.append(f"{name:<28} {pid or 'dead':<8} {rss}")
        for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-A", "-o", "wide")):
            out = self.kubectl(*args, check=False)
            lines.append("\n" + (out.stdout.strip() or out.stderr.strip()))
        return "\n".join(lines)

    def pod_target(self, pod: str, namespace: str) -> tuple[Path, Path | None]:
        """The pod's network namespace (a path) and cgroup (None when it has none the lab can join)."""
        out = self.kubectl("get", "pod", pod, "-n", namespace, "-o", "json", check=False)
        if out.returncode != 0:
            raise LabError(f"pod {namespace}/{pod} not found")
        try:
            return kubeletnode.pod_exec_target(self.layout, json.loads(out.stdout))
        except kubeletnode.NodeStartError as exc:
            raise LabError(str(exc)) from exc

    def exec(self, command: Sequence[str], *, pod: str | None, namespace: str, world: bool) -> int:
        if not command:
            raise LabError("give a command after --, e.g. ciliary lab exec mypod -- curl -s http://10.244.1.2")
        cgroup: Path | None
        if world:
            netns, cgroup = topology.NETNS_DIR / self.layout.world_netns, None
            if not topology.netns_exists(self.layout.world_netns):
                raise LabError("the world host does not exist: is the lab up?")
        elif pod:
            netns, cgroup = self.pod_target(pod, namespace)
        else:
            raise LabError("name a pod, or --world")
        procs = str(cgroup / "cgroup.procs") if cgroup else None

        def enter() -> None:
            if procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        return subprocess.call(["nsenter", f"--net={netns}", *command], preexec_fn=enter)

