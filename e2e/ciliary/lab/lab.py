"""``ciliary lab``: bring the lab up, show it, run commands in it, and take it down.

``up`` is safe to repeat (running parts are left alone, missing ones are started,
more nodes can be added); ``down`` removes everything the lab created, also after
an ``up`` that crashed half way: processes, pod workloads and their cgroups,
network namespaces (and with them every veth and the bridge), bpffs pins, sockets,
and the state directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import (
    cgroups,
    controlplane,
    etcdsecurity,
    kubeletnode,
    peerproxy,
    processes,
    tools,
    topology,
)
from ciliary.lab.layout import (
    MAX_NODES,
    WORLD_DNS_IP,
    WORLD_IP,
    WORLD_TCP_PORTS,
    WORLD_UDP_PORTS,
    Binaries,
    LabLayout,
    node_index,
    node_ip,
    node_name,
    pod_cidr,
)
from ciliary.operator.store import access


def mode_of(config: dict[str, object]) -> str:
    """How the lab proxies Services, as ``lab status`` and ``lab env`` (``CILIARY_LAB_SERVICES``) say it. Pure."""
    if config.get("kube_proxy"):  # the peer, either lab: kube-proxy alone, Ciliary's load balancer off
        return f"kube-proxy-{config['kube_proxy']}"
    if config.get("real_nodes") and not config.get("kube_proxy_replacement"):
        return "kube-proxy"  # beside Ciliary's socket load balancer
    return "kube-proxy-replacement"


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
        removed = config.get("removed")
        gone = set(removed) if isinstance(removed, list) else set()
        return [node_name(i) for i in range(1, count + 1) if node_name(i) not in gone]

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

    # --- up ----------------------------------------------------------------
    def up(self, nodes: int, *, log: bool = True, kube_proxy: str | None = None) -> float:
        """Start (or complete) the lab with ``nodes`` nodes; returns seconds until all nodes were Ready.

        ``kube_proxy`` (iptables or nftables): the real kube-proxy proxies Services instead of Ciliary's load
        balancer (``ciliary.lab.peerproxy``); a lab keeps the choice it was first brought up with.
        """
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates network namespaces and loads eBPF): run as root")
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be between 1 and {MAX_NODES}")
        missing = self.bins.missing()
        if missing:
            raise LabError("control-plane binaries missing: " + ", ".join(map(str, missing))
                           + " — run `make setup` first")
        absent = tools.missing(tools.LAB_SYSTEM_TOOLS)
        if absent:
            raise LabError("; ".join(map(str, absent)))
        if self.config().get("real_nodes"):
            raise LabError("this lab runs real nodes: use `ciliary lab up` (without --process), or `ciliary lab down` "
                           "first")
        saved_proxy = self.kube_proxy_mode()
        if self.config().get("nodes") and kube_proxy is not None and kube_proxy != saved_proxy:
            raise LabError(f"this lab runs with {'kube-proxy ' + saved_proxy if saved_proxy else 'Ciliary load balancing'}"
                           ": `ciliary lab down` first to switch")
        proxy = kube_proxy or saved_proxy
        if proxy:
            try:
                peerproxy.check(proxy)
            except peerproxy.PeerProxyError as exc:
                raise LabError(str(exc)) from exc
        t0 = time.monotonic()
        say = print if log else (lambda *a, **k: None)
        nodes = max(nodes, int(str(self.config().get("nodes", 0))))
        ports = self.ports()
        controlplane.save_config(self.layout, ports, nodes)
        if proxy:
            self.layout.config_file.write_text(json.dumps({**self.config(), "kube_proxy": proxy}))
        say(f"lab: control plane (etcd {ports.etcd_endpoint}, kube-apiserver {ports.apiserver_url})")
        controlplane.start(self.layout, self.bins, ports)
        self.install_crds()
        names = self.node_names()
        self.create_nodes(names)
        say(f"lab: network (underlay 192.0.2.0/24, {len(names)} nodes, world host {WORLD_IP})")
        topology.ensure_underlay(self.layout)
        for node in names:
            topology.ensure_node(self.layout, node, names)
        topology.ensure_world(self.layout, names)
        self.start_world()
        say("lab: node agents, pod runtimes, scheduler")
        for node in names:
            self.start_node_processes(node, ports)
        if not processes.running_pid(self.layout, "scheduler"):
            processes.spawn(self.layout, "scheduler", [sys.executable, "-m", "ciliary.lab.scheduling"],
                            env=self.child_env())
        if proxy:
            say(f"lab: kube-proxy ({proxy} mode) in every node namespace, Ciliary's load balancer off")
            peerproxy.start(self.layout, ports, names, proxy)
        self.start_operator(ports)
        self.start_relay(ports)
        self.start_service_map()
        self.wait_ready(names, seconds=180)
        elapsed = time.monotonic() - t0
        say(f"lab: {len(names)} nodes Ready in {elapsed:.1f} s")
        say(f"lab: run `eval $({Path(sys.argv[0]).name} lab env)` to use kubectl and etcdctl against it")
        return elapsed

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

    def start_node_processes(self, node: str, ports: controlplane.Ports, *, pod_runtime: bool = True) -> None:
        """The node's agent and, unless ``pod_runtime`` is False (a real kubelet runs pods), its pod runtime."""
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
                # socket load balancing for every pod of the node (their cgroups live below this one),
                # unless the real kube-proxy proxies Services in this lab
                *([] if self.kube_proxy_mode() else
                  ["--lb-cgroup", str(cgroups.ensure(cgroups.lab_root(self.layout.cgroup_name) / node))]),
                "--hubble-addr", f"127.0.0.1:{self.hubble_port(node)}",
                # the lab's TTLs are the world DNS server's (seconds), so expiry is observable
                "--fqdn-min-ttl", "1",
                *(["--direct-status", "on", "--kubeconfig", str(self.layout.state_dir / "runtime.kubeconfig")]
                  if self.direct_status() else []),
            ], env={**self.child_env(), "CILIARY_AGENT_NETNS": self.layout.node_netns(node),
                    "CILIARY_AGENT_BPFFS_DIR": str(self.layout.bpffs_dir / node)})
        runtime = f"runtime-{node}"
        if pod_runtime and not processes.running_pid(self.layout, runtime):
            processes.spawn(self.layout, runtime, [sys.executable, "-m", "ciliary.lab.podruntime", "--node", node],
                            env=self.child_env())

    def health_port(self, node: str) -> int:
        return self._saved_port(self.layout.node_dir(node) / "health-port")

    def hubble_port(self, node: str) -> int:
        """The port of the node agent's Hubble Observer API (gRPC)."""
        return self._saved_port(self.layout.node_dir(node) / "hubble-port")

    def relay_port(self) -> int:
        """The port of ``ciliary-relay``, the cluster's one Hubble address (``HUBBLE_SERVER``)."""
        return self._saved_port(self.layout.state_dir / "relay-port")

    @staticmethod
    def _saved_port(path: Path) -> int:
        if path.exists():
            return int(path.read_text())
        path.parent.mkdir(parents=True, exist_ok=True)
        port = controlplane.free_port()
        path.write_text(str(port))
        return port

    def start_relay(self, ports: controlplane.Ports) -> None:
        """``ciliary-relay``: every agent's Observer API on one address, peers from etcd's node records."""
        if processes.running_pid(self.layout, "relay"):
            return
        processes.spawn(self.layout, "relay", [self.bin("ciliary-relay"), "--listen", f"127.0.0.1:{self.relay_port()}",
                                               "--etcd-endpoints", ports.etcd_endpoint,
                                               *self.etcd_flags(access.RELAY_USER), "--refresh", "1"],
                        env=self.child_env())

    def operator_metrics_port(self) -> int:
        """The port of the operator's Prometheus metrics (``GET /metrics``)."""
        return self._saved_port(self.layout.state_dir / "operator-metrics-port")

    def ui_port(self) -> int:
        """The port of ``ciliary-ui``, the service map (``CILIARY_UI_URL``)."""
        return self._saved_port(self.layout.state_dir / "ui-port")

    def etcd_forward_port(self) -> int:
        """Real nodes: the root-namespace port forwarded to the chart's etcd Service (``CILIARY_ETCD_ENDPOINTS``)."""
        return self._saved_port(self.layout.state_dir / "etcd-forward-port")

    def start_service_map(self) -> None:
        """``ciliary-ui``: the service map page, a client of the relay like the hubble CLI."""
        if processes.running_pid(self.layout, "ui"):
            return
        processes.spawn(self.layout, "ui", [self.bin("ciliary-ui"), "--listen", f"127.0.0.1:{self.ui_port()}",
                                            "--server", f"127.0.0.1:{self.relay_port()}"], env=self.child_env())

    def start_operator(self, ports: controlplane.Ports) -> None:
        operator = self.bin("ciliary-operator")
        if processes.running_pid(self.layout, "operator") or importlib.util.find_spec("ciliary.operator.main") is None:
            return
        processes.spawn(self.layout, "operator", [operator, "--kubeconfig", str(self.layout.kubeconfig),
                                                  "--etcd-endpoints", ports.etcd_endpoint,
                                                  *self.etcd_flags(access.OPERATOR_USER),
                                                  "--prometheus-serve-addr", f"127.0.0.1:{self.operator_metrics_port()}",
                                                  *(["--no-enable-k8s-event-handover"] if self.direct_status() else []),
                                                  *(["--no-load-balancing"] if self.kube_proxy_mode() else [])],
                        env=self.child_env())

    def kube_proxy_mode(self) -> str | None:
        """The real kube-proxy's mode when it proxies this lab's Services (``lab up --kube-proxy``), else None."""
        mode = self.config().get("kube_proxy")
        return str(mode) if mode else None

    def direct_status(self) -> bool:
        """CILIARY_LAB_STATUS_MODE=direct: agents patch policy status themselves (no handover)."""
        return os.environ.get("CILIARY_LAB_STATUS_MODE", "handover") == "direct"

    def wait_ready(self, names: Sequence[str], *, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode == 0:
                ready = {n["metadata"]["name"] for n in json.loads(out.stdout)["items"]
                         if any(c["type"] == "Ready" and c["status"] == "True"
                                for c in n.get("status", {}).get("conditions", []))}
                if set(names) <= ready:
                    return
            for node in names:
                for proc in (f"agent-{node}", f"runtime-{node}"):
                    if not processes.running_pid(self.layout, proc):
                        raise processes.ProcessStartError(proc, self.layout.log_dir / f"{proc}.log")
            time.sleep(0.5)
        raise LabError(f"nodes not Ready after {seconds:.0f} s; see {self.layout.log_dir}")

    def remove_node(self, node: str, *, log: bool = True) -> None:
        """Take one node out of the lab: its processes, pods, namespace and Node object.

        ``lab up`` brings every node back.
        """
        say = print if log else (lambda *a, **k: None)
        if node not in self.node_names():
            raise LabError(f"{node} is not a node of this lab (nodes: {', '.join(self.node_names()) or 'none'})")
        for name in (f"runtime-{node}", f"agent-{node}"):
            if processes.stop(self.layout, name):
                say(f"lab: stopped {name}")
        cgroups.remove_tree(cgroups.lab_root(self.layout.cgroup_name) / node)
        pods_dir = self.layout.node_dir(node) / "pods"
        for record in pods_dir.glob("*.json") if pods_dir.exists() else []:
            try:
                netns = json.loads(record.read_text())["netns"]
            except (OSError, ValueError, KeyError):
                continue
            topology.ip("netns", "del", netns, check=False)
        topology.remove_node(self.layout, node)
        shutil.rmtree(self.layout.node_dir(node), ignore_errors=True)
        shutil.rmtree(self.layout.bpffs_dir / node, ignore_errors=True)
        self.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false")
        if processes.running_pid(self.layout, "etcd"):
            etcdsecurity.remove_node(self.ports().etcd_endpoint, self.etcd_certs(), node)
        config = self.config()
        before = config.get("removed")
        config["removed"] = sorted({*(before if isinstance(before, list) else []), node})
        self.layout.config_file.write_text(json.dumps(config))
        say(f"lab: removed {node}")

    # --- down --------------------------------------------------------------
    def down(self, *, log: bool = True) -> None:
        say = print if log else (lambda *a, **k: None)
        for node in kubeletnode.teardown_all(self.layout):  # real nodes first: their mounts live in state_dir
            say(f"lab: removed real node {node}")
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
                # the relay and the service map: processes of the process lab; on real nodes the chart's
                # Services, forwarded to the same ports by ciliary.lab.serviceforward
                *([] if self.config().get("real_nodes") and not processes.running_pid(self.layout, "service-forward")
                  else [f"export HUBBLE_SERVER=127.0.0.1:{self.relay_port()}",
                        f"export CILIARY_UI_URL=http://127.0.0.1:{self.ui_port()}"]),
                f"export PATH={Path(sys.executable).parent}:{self.bins.kubectl.parent}:{self.bins.etcdctl.parent}:"
                f"{tools.built_path('hubble').parent}:{tools.built_path('helm').parent}:"
                # skaffold when built (setup/build-node-tools.sh skaffold; make test builds it)
                f"{f'{skaffold.parent}:' if (skaffold := tools.built_path('skaffold')).exists() else ''}$PATH",
                *self.process_cli_env_lines(), *self.chart_cli_env_lines(), *self.real_node_env_lines()]

    def env(self) -> dict[str, str]:
        """What ``eval $(ciliary lab env)`` sets, as a dict (``$PATH`` expanded from this process's)."""
        out = {}
        for line in self.env_lines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value.replace("$PATH", os.environ.get("PATH", ""))
        return out

    def process_cli_env_lines(self) -> list[str]:
        """The process lab: the CLI reads its etcd as ``ciliary-reader`` (etcdctl above is root)."""
        if self.config().get("real_nodes"):
            return []
        reader = self.etcd_certs().client(access.READER_USER)
        return [f"export CILIARY_ETCD_ENDPOINTS={self.ports().etcd_endpoint}",
                f"export CILIARY_ETCD_CA_FILE={reader.ca_file}", f"export CILIARY_ETCD_CERT_FILE={reader.cert_file}",
                f"export CILIARY_ETCD_KEY_FILE={reader.key_file}"]

    def chart_cli_env_lines(self) -> list[str]:
        """Real nodes: the CLI's way to the chart's etcd (the service forward's port, the ``ciliary-reader``
        certificate from the chart's Secret) and to the agents (kubectl exec: ``ciliary.cli.agent_access``)."""
        port = self.layout.state_dir / "etcd-forward-port"
        if not self.config().get("real_nodes") or not port.exists() or \
                not processes.running_pid(self.layout, "service-forward"):
            return []
        from ciliary.lab import chartinstall  # it imports the image builders; only real-node labs need it

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
        if not self.config().get("real_nodes") or not registry.exists():
            return []
        values = self.layout.state_dir / "chart-values.yaml"
        sys_resource = "false" if values.exists() and "sysResource: false" in values.read_text() else "true"
        from ciliary.lab import chartinstall  # it imports the image builders; only real-node labs need it

        lines = [f"export SKAFFOLD_DEFAULT_REPO=localhost:{registry.read_text().strip()}",
                 f"export CILIARY_LAB_SYS_RESOURCE={sys_resource}",
                 f"export CILIARY_LAB_ETCD_IMAGE={chartinstall.etcd_image_reference()}"]
        # skaffold.yaml's lab profile: the load balancer `lab up` installs the chart with, on each node's cgroup
        peer = bool(self.config().get("kube_proxy"))  # kube-proxy alone: Ciliary's load balancer off everywhere
        lines += [f"export CILIARY_LAB_LB_ENABLED={'false' if peer else 'true'}",
                  f"export CILIARY_LAB_OPERATOR_LB={'false' if peer else 'true'}",
                  f"export CILIARY_LAB_LB_CGROUP_PREFIX={chartinstall.node_cgroup_prefix(self.layout.prefix)}"]
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
        obj = json.loads(out.stdout)
        if self.config().get("real_nodes"):
            try:
                return kubeletnode.pod_exec_target(self.layout, obj)
            except kubeletnode.NodeStartError as exc:
                raise LabError(str(exc)) from exc
        node, uid = obj["spec"].get("nodeName"), obj["metadata"]["uid"]
        netns = self.layout.pod_netns(namespace, pod, uid)
        if not node or not topology.netns_exists(netns):
            raise LabError(f"pod {namespace}/{pod} is not running (phase {obj.get('status', {}).get('phase')})")
        return topology.NETNS_DIR / netns, cgroups.pod_cgroup(self.layout.cgroup_name, node, uid)

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


def node_ips(names: Sequence[str]) -> dict[str, str]:
    return {n: node_ip(node_index(n)) for n in names}
