"""Cluster-wide parts a lab of real nodes adds to the control plane: the kube-scheduler, the gateway
between node namespaces and the apiserver, and the apiserver flags that go with them.

How kubelets and the apiserver reach each other (the invariant: no lab address or route in the
root namespace): the apiserver stays on 127.0.0.1 in the root namespace. Nodes reach it through a
relay the gateway keeps inside every node namespace (``127.0.0.1:6443``); the apiserver reaches
kubelets (exec, logs, port-forward) through its egress selector, as HTTP CONNECT over a unix socket
to the gateway, which dials from inside the namespace that owns the node address
(``ciliary.lab.nodegateway``). The apiserver authenticates to kubelets with a client certificate
of the lab CA and prefers InternalIP (the node namespace's underlay address), so it never resolves
node names.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ciliary.lab import controlplane, nodeconfig, nodegateway, pki, processes
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.layout import LabLayout, node_index, node_ip, pod_cidr
from ciliary.lab.nodebins import NodeBinaries

GATEWAY = "node-gateway"
SCHEDULER = "kube-scheduler"
REGISTRY = "registry"


class ClusterStartError(RuntimeError):
    """The gateway or the scheduler did not come up; carries the process name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def egress_socket(layout: LabLayout) -> Path:
    return Path("/run/ciliary") / layout.prefix / "egress.sock"


def apiserver_args(layout: LabLayout, *, static_kubernetes_endpoints: bool = False) -> list[str]:
    """Flags the apiserver needs to reach real kubelets (certificates and files made here).

    ``static_kubernetes_endpoints`` (chart mode): the apiserver does not publish itself (127.0.0.1) as
    the ``kubernetes`` Service's endpoint; the lab does (``nodeservices.SERVICES``).
    """
    p = layout.pki_dir
    pki.ensure_ca(p)
    pki.ensure_cert(p, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    egress = layout.state_dir / "egress-selector.yaml"
    egress.write_text(nodeconfig.dump_yaml(nodeconfig.egress_selector_config(egress_socket(layout))))
    return [
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        f"--egress-selector-config-file={egress}",
        *(["--endpoint-reconciler-type=none"] if static_kubernetes_endpoints else []),
    ]


def start_gateway(layout: LabLayout, ports: controlplane.Ports, nodes: Sequence[str], *,
                  registry_port: int | None = None, kubernetes_service: bool = False, seconds: float = 20) -> None:
    """(Re)start the gateway for ``nodes`` (it binds its relays in every node namespace at start).

    ``kubernetes_service``: also relay ``NODE_SERVICES_IP:443`` (an address of every node namespace, the
    ``kubernetes`` Service's endpoint: ``ciliary.lab.nodeservices``) to the apiserver.
    """
    processes.stop(layout, GATEWAY)
    argv = [sys.executable, "-m", "ciliary.lab.nodegateway", "--apiserver-port", str(ports.apiserver),
            "--egress-socket", str(egress_socket(layout)),
            *(["--forward", str(registry_port)] if registry_port else []),
            *(["--service", f"{nodeconfig.NODE_SERVICES_IP}:443={ports.apiserver}"] if kubernetes_service
              else [])]
    for node in nodes:
        argv += ["--node", nodegateway.GatewayNode(node, layout.node_netns(node), node_ip(node_index(node)),
                                                   pod_cidr(node_index(node))).flag()]
    processes.spawn(layout, GATEWAY, argv, env={"PYTHONUNBUFFERED": "1"})
    if not processes.wait_for_line(layout, GATEWAY, "gateway ready", seconds):
        raise ClusterStartError(GATEWAY, f"not ready after {seconds:.0f} s; see {layout.log_dir / GATEWAY}.log")


def start_scheduler(layout: LabLayout, bins: NodeBinaries, ports: controlplane.Ports) -> None:
    if processes.running_pid(layout, SCHEDULER):
        return
    p = layout.pki_dir
    pki.ensure_cert(p, "kube-scheduler", "/CN=system:kube-scheduler")
    kc = layout.state_dir / "kube-scheduler.kubeconfig"
    write_kubeconfig(kc, server=ports.apiserver_url, pki=p, user="kube-scheduler")
    processes.spawn(layout, SCHEDULER, [
        str(bins.kube_scheduler), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
        f"--secure-port={controlplane.free_port()}", "--leader-elect=false", "--v=1",
    ])
    processes.wait_alive(layout, SCHEDULER, 2.0)


def registry_port(layout: LabLayout) -> int:
    """The lab registry's loopback port, chosen once and kept in the state directory."""
    path = layout.state_dir / "registry-port"
    if path.exists():
        return int(path.read_text())
    port = controlplane.free_port()
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(str(port))
    return port


def start_registry(layout: LabLayout, bins: NodeBinaries, *, seconds: float = 20) -> int:
    """The lab's image registry (distribution) on 127.0.0.1:<port>; returns the port.

    Nodes reach it at the same address through the gateway's relay, and their containerd is told
    (``nodeconfig.registry_hosts``) to speak plain HTTP to it.
    """
    port = registry_port(layout)
    if not processes.running_pid(layout, REGISTRY):
        config = layout.state_dir / "registry.yaml"
        config.write_text(nodeconfig.dump_yaml(nodeconfig.registry_config(layout.state_dir / "registry", port)))
        processes.spawn(layout, REGISTRY, [str(bins.registry), "serve", str(config)])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not processes.running_pid(layout, REGISTRY):
            raise processes.ProcessStartError(REGISTRY, layout.log_dir / f"{REGISTRY}.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return port
        except OSError:
            time.sleep(0.2)
    raise ClusterStartError(REGISTRY, f"not answering on 127.0.0.1:{port} after {seconds:.0f} s")
