"""The handle e2e tests drive a lab with: kubectl, pods, probes, the ciliary CLI, the Hubble relay, the
service map and the agents' and operator's metrics.

The lab is the real-node lab (``ciliary lab up``: kubelets, Ciliary installed by its chart, Ciliary's etcd
is the chart's bundled etcd on a node's network). A manifest's ``image: lab`` containers become the lab app
image (``ciliary.lab.labimage``), and the ``ciliary`` CLI runs inside the network namespace of the node that
hosts the chart's etcd, with the chart's ``ciliary-reader`` certificate, a kubeconfig through that node's
apiserver relay and the lab's kubectl (``CILIARY_KUBECTL``): the CLI reaches every other node's agent
through that node's agent pod (``ciliary.cli.agent_access``). The relay and the service map are the chart's
``hubble-relay`` and ``hubble-ui`` Services, which the lab forwards to loopback ports of this shell
(``ciliary.lab.serviceforward``); the agents' and the operator's metrics listeners are the chart's
node-local ones (host network, a node's loopback), read inside that node's network namespace, and forwarded
for a scrape from this shell (:meth:`LabHandle.scrape_targets`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import controlplane, kubeletnode, labimage, nodehost, processes, reallab, topology
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.lab import Lab, mode_of
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT

#: the chart's bundled etcd (host network) as seen from inside the node that runs it: the server
#: certificate names 127.0.0.1
CHART_ETCD_ENDPOINT = "https://127.0.0.1:2379"
#: the chart agent's /healthz, /readyz, /metrics and /v1/... listener (charts/ciliary values ``agent.healthAddr``)
CHART_AGENT_HEALTH = "127.0.0.1:9876"
#: etcdctl with the CLI's etcd and reader certificate (``CILIARY_ETCD_*`` from ``ciliary lab env``)
CLI_ETCDCTL = ('etcdctl --dial-timeout=5s --endpoints="$CILIARY_ETCD_ENDPOINTS" --cacert="$CILIARY_ETCD_CA_FILE" '
               '--cert="$CILIARY_ETCD_CERT_FILE" --key="$CILIARY_ETCD_KEY_FILE"')


@dataclass(frozen=True)
class ScrapeTargets:
    """``host:port`` addresses a process of this shell (a real Prometheus) scrapes ``/metrics`` at."""

    agents: dict[str, str]
    operator: str


@dataclass
class LabHandle:
    lab: Lab

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        if input and args and args[0] in ("apply", "create"):
            input = labimage.manifest_for_real_nodes(input)
        return self.lab.kubectl(*args, input=input, check=check)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)

    def wait_running(self, name: str, namespace: str = "default", seconds: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.pod(name, namespace)
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in pod.get("status", {}).get("conditions", []))
            if pod.get("status", {}).get("phase") == "Running" and ready and pod["status"].get("podIP"):
                return pod
            time.sleep(0.5)
        events = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                              f"involvedObject.name={name}", check=False).stdout
        pytest.fail(f"pod {namespace}/{name} not Running after {seconds} s: {pod.get('status')}\n{events}")

    def netns(self, pod: str, namespace: str = "default") -> str:
        """The path of the pod's network namespace file (a containerd pod's is not in /run/netns)."""
        return str(self.lab.pod_target(pod, namespace)[0])

    def node_netns(self, node: str) -> str:
        return str(topology.NETNS_DIR / self.lab.layout.node_netns(node))

    def world_netns(self) -> str:
        return str(topology.NETNS_DIR / self.lab.layout.world_netns)

    def agent_get(self, node: str, path: str, timeout: float = 5) -> str:
        """GET an agent's health/debug endpoint (``/v1/enforcement``, ``/metrics``, ...); ``<error>`` if none."""
        return http_get_in(self.node_netns(node), f"http://{CHART_AGENT_HEALTH}{path}", timeout)

    def agent_json(self, node: str, path: str, timeout: float = 5) -> dict[str, Any]:
        """An agent's JSON document (``/v1/services``, ``/v1/enforcement``); OSError when it does not answer 200."""
        text = self.agent_get(node, path, timeout)
        if text.startswith("<"):
            raise OSError(f"{node} {path}: {text}")
        return dict(json.loads(text))

    def node_host_cgroup(self, node: str) -> Path:
        """The cgroup v2 directory of ``node``'s own processes (the node's socket load balancer is attached
        there): the node's cgroup root (its kubelet's ``cgroupRoot``)."""
        unified = nodehost.cgroup_layout().unified
        assert unified is not None, "real nodes need cgroup v2"
        return unified / kubeletnode.node_paths(self.lab.layout, node).cgroup_root.lstrip("/")

    @property
    def kube_proxy_replacement(self) -> bool:
        """Ciliary's load balancer alone serves Services (a lab up with ``--kube-proxy-replacement``)."""
        return mode_of(self.lab.config()) == "kube-proxy-replacement"

    def assert_own_agent(self, node: str, via: str) -> None:
        """``via`` (how the CLI says it reached node's agent, ``ciliary.cli.agent_access``) is node's own agent,
        checked outside the CLI: a pod kubectl places on node, or the CLI's own node's loopback."""
        pod = re.fullmatch(rf"in pod kube-system/(\S+) on node (\S+) \(kubectl exec, {re.escape(CHART_AGENT_HEALTH)}\)",
                           via)
        if pod is None:  # the CLI runs in the chart etcd's node: its loopback is that node's agent
            assert via == f"at http://{CHART_AGENT_HEALTH}" and node == self.chart_etcd_node(), (node, via)
            return
        assert pod.group(2) == node, (node, via)
        placed = self.kubectl("get", "pod", "-n", "kube-system", pod.group(1), "-o", "jsonpath={.spec.nodeName}")
        assert placed.stdout == node, (node, via, placed.stdout)

    # --- Hubble: the relay, the service map, metrics ------------------------------------------------------
    def relay_address(self) -> str:
        """The cluster's one Hubble address from this shell (``HUBBLE_SERVER``): the chart's ``hubble-relay``
        Service through the lab's forward."""
        self._need_service_forward()
        return f"127.0.0.1:{self.lab.relay_port()}"

    def ui_url(self) -> str:
        """The service map from this shell (``CILIARY_UI_URL``): the chart's ``hubble-ui`` Service through the
        lab's forward."""
        self._need_service_forward()
        return f"http://127.0.0.1:{self.lab.ui_port()}"

    def _need_service_forward(self) -> None:
        if not processes.running_pid(self.lab.layout, reallab.SERVICE_FORWARD):
            pytest.fail(f"the lab's {reallab.SERVICE_FORWARD} is not running: the chart's relay and UI are "
                        "unreachable from this shell (`ciliary lab up` starts it)")

    def agent_metrics(self, node: str) -> str:
        """The node's agent's ``/metrics`` (Prometheus text); the test fails when it does not answer."""
        text = self.agent_get(node, "/metrics", timeout=10)
        if text.startswith("<"):
            pytest.fail(f"the agent of {node} served no /metrics: {text}")
        return text

    def operator_address(self) -> tuple[str, str]:
        """The operator's metrics listener: (the node namespace it is reached in, ``host:port``): the chart's
        operator pod (host network) and the ``CILIARY_OPERATOR_PROMETHEUS_SERVE_ADDR`` its pod spec gives
        (``operator.prometheusServeAddr``)."""
        out = self.kubectl("get", "pods", "-n", "kube-system", "-l", "app.kubernetes.io/component=operator",
                           "-o", "json")
        pods = [p for p in json.loads(out.stdout)["items"] if p["status"].get("phase") == "Running"]
        if not pods:
            pytest.fail(f"no Running operator pod:\n{self.kubectl('get', 'pods', '-A').stdout}")
        pod = pods[0]
        if not pod["spec"].get("hostNetwork"):
            pytest.fail("the chart's operator is not on the host network: its metrics are not node-local")
        env = {e["name"]: e.get("value", "") for c in pod["spec"]["containers"] for e in c.get("env", [])}
        addr = env.get("CILIARY_OPERATOR_PROMETHEUS_SERVE_ADDR", "off")
        if addr == "off":
            pytest.fail("the chart's operator serves no metrics (operator.prometheusServeAddr: off)")
        addr = addr.replace("$(CILIARY_OPERATOR_POD_IP)", pod["status"].get("podIP", ""))
        return self.node_netns(pod["spec"]["nodeName"]), addr

    def operator_metrics(self) -> str:
        """The operator's ``/metrics`` (Prometheus text); the test fails when it does not answer."""
        netns, addr = self.operator_address()
        text = http_get_in(netns, f"http://{addr}/metrics", 10)
        if text.startswith("<"):
            pytest.fail(f"the operator served no /metrics at {addr}: {text}")
        return text

    @contextlib.contextmanager
    def scrape_targets(self, nodes: Sequence[str]) -> Iterator[ScrapeTargets]:
        """Addresses of this shell where the agents' of ``nodes`` and the operator's ``/metrics`` answer, for a
        real Prometheus run here. The chart's listeners are on each node's loopback, so one
        ``ciliary.lab.serviceforward`` per node namespace forwards a free loopback port of this shell to each
        (stopped on exit)."""
        operator_netns, operator_addr = self.operator_address()
        wanted: dict[str, list[tuple[str, str]]] = {}  # netns -> (what, address in it)
        for node in nodes:
            wanted.setdefault(self.node_netns(node), []).append((node, CHART_AGENT_HEALTH))
        wanted.setdefault(operator_netns, []).append(("operator", operator_addr))
        found: dict[str, str] = {}
        procs: list[subprocess.Popen[str]] = []
        try:
            for netns, listeners in wanted.items():
                argv = [sys.executable, "-m", "ciliary.lab.serviceforward", "--netns", Path(netns).name]
                for what, addr in listeners:
                    found[what] = f"127.0.0.1:{controlplane.free_port()}"
                    argv += ["--forward", f"{found[what].rsplit(':', 1)[1]}={addr}"]
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                procs.append(proc)
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 30)  # it binds and says so, or exits
                line = proc.stdout.readline() if ready else "<nothing after 30 s>"
                if line.strip() != "forward ready":
                    proc.kill()
                    pytest.fail(f"metrics forward for {netns} not ready: {line!r} {proc.communicate(timeout=10)}")
            yield ScrapeTargets({n: found[n] for n in nodes}, found["operator"])
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        out = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                           f"involvedObject.name={name}", "-o", "json")
        return list(json.loads(out.stdout)["items"])

    def probe(self, kind: str, ip: str, port: int = 0, *, pod: str | None = None, namespace: str = "default",
              world: bool = False, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
        """Run ``ciliary.lab.probe`` inside a pod (or on the world host); returncode 0 = answered."""
        netns: Path  # a path: pod_target gives the pod's namespace file (a containerd pod's is not in /run/netns)
        if world:
            netns = topology.NETNS_DIR / self.lab.layout.world_netns
        else:
            assert pod is not None
            netns, _ = self.lab.pod_target(pod, namespace)
        argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", kind, ip]
        if port:
            argv.append(str(port))
        return subprocess.run([*argv, "--timeout", str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 30)

    @property
    def etcd_endpoint(self) -> str:
        """Ciliary's etcd as :meth:`ciliary` reaches it (from inside the etcd pod's node)."""
        return CHART_ETCD_ENDPOINT

    def ciliary(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net={self.node_netns(self.chart_etcd_node())}", sys.executable, "-m",
                "ciliary.cli.main", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=self.env())

    def chart_etcd_node(self) -> str:
        out = self.kubectl("get", "pods", "-n", "kube-system", "-l", "app.kubernetes.io/component=etcd", "-o",
                           "json")
        nodes = [p["spec"].get("nodeName") for p in json.loads(out.stdout)["items"]
                 if p["status"].get("phase") == "Running"]
        if not nodes:
            pytest.fail(f"the chart's etcd runs on no node:\n{self.kubectl('get', 'pods', '-A').stdout}")
        return str(nodes[0])

    def chart_credentials(self) -> tuple[Path, Path, Path, Path]:
        """The chart's etcd CA, the ``ciliary-reader`` certificate and key (from its Secret: the CLI reads, it
        never writes) and a kubeconfig through a node's apiserver relay, under the lab's state directory."""
        from ciliary.lab import chartinstall  # it imports the image builders: only when a test asks

        where = self.lab.layout.state_dir / "e2e-cli"
        # read every time: a reinstalled chart (chart_installed) makes a new CA and certificates
        files = chartinstall.cli_etcd_files(lambda *a, **k: self.kubectl(*a, **k), where)
        assert files is not None, f"no {chartinstall.ETCD_READER_SECRET} Secret with ca.crt, tls.crt and tls.key"
        kubeconfig = where / "relay.kubeconfig"
        if not kubeconfig.exists():
            write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}",
                             pki=self.lab.layout.pki_dir, user="admin")
        return (*files, kubeconfig)

    def user_shell(self, *lines: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``lines`` in bash after ``eval $(ciliary lab env)``, as a user's shell runs them (``set -e``); etcdctl's
        own variables (the lab's Kubernetes etcd, as root) unset, so each command names the etcd it means
        (``CLI_ETCDCTL``: the chart's, as the CLI's reader)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDCTL_", "CILIARY_ETCD_"))}
        script = "\n".join(["set -e", *self.lab.env_lines(), "unset ${!ETCDCTL_*}", *lines])
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout, env=env)

    def env(self) -> dict[str, str]:
        """This lab's environment: never an etcd or kubeconfig the calling shell points at."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ETCDCTL_", "CILIARY_ETCD_")) and k != "KUBECONFIG"}
        lab_env = {"CILIARY_LAB_DIR": str(self.lab.layout.state_dir), "CILIARY_LAB_PREFIX": self.lab.layout.prefix}
        ca, cert, key, kubeconfig = self.chart_credentials()
        return {**env, **lab_env, "KUBECONFIG": str(kubeconfig), "CILIARY_KUBECTL": str(self.lab.bins.kubectl),
                "CILIARY_ETCD_ENDPOINTS": CHART_ETCD_ENDPOINT,
                "CILIARY_ETCD_CA_FILE": str(ca), "CILIARY_ETCD_CERT_FILE": str(cert),
                "CILIARY_ETCD_KEY_FILE": str(key)}


def lab_logs(state_dir: Path) -> dict[Path, bytes]:
    """Every log file (``*.log*``) under a lab's state directory with its content, as it is now. Containerd's
    snapshots and the pods' directories change while the lab runs: a directory or file gone between listing
    and reading is skipped (it holds nothing any more; ``Path.rglob`` raised instead)."""
    found: dict[Path, bytes] = {}
    for root, _dirs, files in os.walk(state_dir):  # a directory that vanished is passed over
        for name in fnmatch.filter(files, "*.log*"):
            path = Path(root, name)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                if path.is_file():
                    found[path] = path.read_bytes()
    return found


def http_get_in(netns: str, url: str, timeout: float) -> str:
    """GET ``url`` from inside network namespace ``netns`` (a path); the body, or ``<error>``."""
    out = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c",
                          "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                          f"{url!r}, timeout={timeout}).read().decode())"],
                         capture_output=True, text=True, timeout=timeout + 30)
    return out.stdout if out.returncode == 0 else f"<{out.stderr.strip()[-300:]}>"


def wait_for(what: str, check: Any, seconds: float = 60) -> Any:
    """``check()``'s first truthy result, polled every 0.5 s; the test fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")
