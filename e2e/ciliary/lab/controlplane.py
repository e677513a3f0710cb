"""The lab's control plane: etcd, kube-apiserver and kube-controller-manager on loopback.

Ports are chosen free at first start and kept in ``lab.json``; a second ``lab up``
finds the processes running and leaves them alone. kube-apiserver serves TLS with
client-certificate authentication and RBAC; etcd serves mutual TLS only, with
authentication and a role per caller (``etcdsecurity``), even on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ciliary.lab import etcdsecurity, pki, processes
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.layout import Binaries, LabLayout


class ControlPlaneError(RuntimeError):
    """A control-plane component did not become ready."""


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @property
    def etcd_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.etcd_client}"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_or_choose_ports(layout: LabLayout) -> Ports:
    try:
        data = json.loads(layout.config_file.read_text())
        return Ports(**data["ports"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    chosen: set[int] = set()
    values: list[int] = []
    while len(values) < 4:
        port = free_port()
        if port not in chosen:
            chosen.add(port)
            values.append(port)
    return Ports(*values)


def save_config(layout: LabLayout, ports: Ports, nodes: int) -> None:
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(json.dumps({"ports": asdict(ports), "nodes": nodes, "prefix": layout.prefix}))


def _wait_http(url: str, *, seconds: float, what: str, context: ssl.SSLContext | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise ControlPlaneError(f"{what} not ready after {seconds:.0f} s ({last})\n{tail}")


def start_etcd(layout: LabLayout, bins: Binaries, ports: Ports) -> None:
    """Start etcd (TLS only, client-certificate auth) and make sure its users, roles and auth are in place."""
    certs = etcdsecurity.etcd_pki(layout.pki_dir)
    if not processes.running_pid(layout, "etcd"):
        data = layout.state_dir / "etcd-data"
        peer = f"http://127.0.0.1:{ports.etcd_peer}"  # a one-member cluster: no peer ever connects
        processes.spawn(layout, "etcd", [
            str(bins.etcd), "--name", "lab", "--data-dir", str(data),
            "--listen-client-urls", ports.etcd_endpoint, "--advertise-client-urls", ports.etcd_endpoint,
            *etcdsecurity.server_flags(certs),
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"lab={peer}", "--logger", "zap", "--log-level", "warn",
            "--unsafe-no-fsync", "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
            "--listen-metrics-urls", "http://127.0.0.1:0",
        ])
    _wait_http(f"{ports.etcd_endpoint}/health", seconds=30, what="etcd", log=layout.log_dir / "etcd.log",
               context=etcd_tls_context(layout))
    etcdsecurity.bootstrap(ports.etcd_endpoint, certs)


def etcd_tls_context(layout: LabLayout, user: str = "root") -> ssl.SSLContext:
    """An SSL context that reaches the lab's etcd as etcd user ``user``."""
    return etcdsecurity.tls_context(etcdsecurity.etcd_pki(layout.pki_dir).client(user))


def _tls_context(layout: LabLayout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(layout.pki_dir / "admin.crt"), str(layout.pki_dir / "admin.key"))
    return ctx


def start_apiserver(layout: LabLayout, bins: Binaries, ports: Ports, extra_args: Sequence[str] = (),
                    *, pod_tokens: bool = False) -> None:
    """``extra_args``: appended flags (real nodes add the kubelet client and egress-selector ones).

    ``pod_tokens``: keep the ServiceAccount admission plugin (pods get their token volume), for pods run by
    real kubelets that talk to the apiserver (the chart's operator).
    """
    p = layout.pki_dir
    etcd_client = etcdsecurity.etcd_pki(p).client(etcdsecurity.APISERVER_USER)
    if not processes.running_pid(layout, "kube-apiserver"):
        processes.spawn(layout, "kube-apiserver", [
            str(bins.kube_apiserver),
            f"--etcd-servers={ports.etcd_endpoint}", "--etcd-prefix=/registry",
            f"--etcd-cafile={etcd_client.ca_file}", f"--etcd-certfile={etcd_client.cert_file}",
            f"--etcd-keyfile={etcd_client.key_file}",
            # etcd compacts itself (--auto-compaction-* above); compaction is an etcd administrator's
            # right, which the apiserver's confined etcd user does not have, so its own compactor
            # (every 5 min by default) would only log "permission denied"
            "--etcd-compaction-interval=0",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}", f"--cert-dir={p}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--service-account-issuer={ports.apiserver_url}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # without pod_tokens (no chart, or no kubelet at all: the integration tests' control plane) no
            # token volumes are needed, and no race between namespace creation and its default ServiceAccount
            *([] if pod_tokens else ["--disable-admission-plugins=ServiceAccount"]),
            "--profiling=false", "--v=0", *extra_args,
        ])
    _wait_http(f"{ports.apiserver_url}/readyz", seconds=120, what="kube-apiserver",
               context=_tls_context(layout), log=layout.log_dir / "kube-apiserver.log")


def start_controller_manager(layout: LabLayout, bins: Binaries, ports: Ports) -> None:
    if processes.running_pid(layout, "kube-controller-manager"):
        return
    kc = layout.state_dir / "controller-manager.kubeconfig"
    p = layout.pki_dir
    processes.spawn(layout, "kube-controller-manager", [
        str(bins.kube_controller_manager),
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", f"--secure-port={ports.controller_manager}",
        "--leader-elect=false", f"--service-account-private-key-file={p / 'sa.key'}",
        f"--root-ca-file={p / 'ca.crt'}", "--service-cluster-ip-range=10.96.0.0/16",
        "--use-service-account-credentials=true",
        # pod CIDRs are assigned by the lab (Node.spec.podCIDR), not by node-ipam
        "--controllers=*,-nodeipam", "--v=0",
    ])
    processes.wait_alive(layout, "kube-controller-manager", 2.0)


def ensure_pki(layout: LabLayout) -> None:
    p = layout.pki_dir
    pki.ensure_ca(p)
    pki.ensure_cert(p, "apiserver", "/CN=kube-apiserver", server=True)
    pki.ensure_cert(p, "admin", "/O=system:masters/CN=ciliary-admin")
    pki.ensure_cert(p, "controller-manager", "/CN=system:kube-controller-manager")
    pki.ensure_cert(p, "ciliary-lab", "/O=system:masters/CN=ciliary-lab-runtime")
    etcdsecurity.etcd_pki(p).ensure()


def write_kubeconfigs(layout: LabLayout, ports: Ports) -> None:
    server = ports.apiserver_url
    write_kubeconfig(layout.kubeconfig, server=server, pki=layout.pki_dir, user="admin")
    write_kubeconfig(layout.state_dir / "controller-manager.kubeconfig", server=server,
                     pki=layout.pki_dir, user="controller-manager")
    write_kubeconfig(layout.state_dir / "runtime.kubeconfig", server=server,
                     pki=layout.pki_dir, user="ciliary-lab")


def kubectl(layout: LabLayout, bins: Binaries, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bins.kubectl), f"--kubeconfig={layout.kubeconfig}", *args],
        input=input, text=True, capture_output=True, check=check, timeout=120,
    )


def start(layout: LabLayout, bins: Binaries, ports: Ports, apiserver_args: Sequence[str] = (), *,
          pod_tokens: bool = False) -> None:
    ensure_pki(layout)
    write_kubeconfigs(layout, ports)
    start_etcd(layout, bins, ports)
    start_apiserver(layout, bins, ports, apiserver_args, pod_tokens=pod_tokens)
    start_controller_manager(layout, bins, ports)
