"""Integration fixtures: a real etcd + kube-apiserver (+ kube-controller-manager) on loopback.

The control plane is the lab's own (``ciliary.lab.controlplane``) under a separate
prefix and state directory, started once per session and removed afterwards. Its etcd
is the lab's: TLS only, authentication on; tests reach it as a named etcd user
(``Kube.etcd_store``, ``Kube.etcd_flags``), normally the operator's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliary.lab import controlplane, etcdsecurity, sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import CONTROL_PLANE_TOOLS, Binaries
from ciliary.operator.store import access
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdStore, EtcdTLS

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Kube:
    """A running control plane for tests."""

    lab: Lab
    ports: controlplane.Ports

    @property
    def kubeconfig(self) -> Path:
        return self.lab.layout.kubeconfig

    @property
    def etcd_endpoint(self) -> str:
        return self.ports.etcd_endpoint

    def etcd_tls(self, user: str = access.OPERATOR_USER) -> EtcdTLS:
        """Client credentials of etcd user ``user`` (root, the operator, kube-apiserver)."""
        return self.lab.etcd_certs().client(user)

    def etcd_node_tls(self, node: str) -> EtcdTLS:
        """Create ``node``'s etcd user and role (as the lab does for its agents); its credentials."""
        return etcdsecurity.add_node(self.etcd_endpoint, self.lab.etcd_certs(), node)

    def etcd_store(self, user: str = access.OPERATOR_USER, **kwargs: object) -> EtcdStore:
        return EtcdStore(EtcdEndpoint.parse(self.etcd_endpoint), tls=self.etcd_tls(user), **kwargs)  # type: ignore[arg-type]

    def etcd_flags(self, user: str = access.OPERATOR_USER) -> list[str]:
        """``--etcd-endpoints`` and ``--etcd-*-file`` flags of a component running as ``user``."""
        return ["--etcd-endpoints", self.etcd_endpoint, *self.lab.etcd_flags(user)]

    def kubectl(self, *args: str, input: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.lab.kubectl(*args, input=input, check=check)


@pytest.fixture(scope="session")
def kube(tool) -> Iterator[Kube]:
    for name in (*CONTROL_PLANE_TOOLS, "openssl"):  # openssl makes the control plane's PKI
        tool(name)
    sessions.reap_stale(ROOT, "integration", "i")
    layout = sessions.session_layout(ROOT, "integration", "i")
    lab = Lab(layout, Binaries.discover())
    ports = controlplane.load_or_choose_ports(layout)
    controlplane.save_config(layout, ports, 0)
    try:
        controlplane.start(layout, lab.bins, ports)
        yield Kube(lab, ports)
    finally:
        lab.down(log=False)
