"""Integration fixtures: a real etcd + kube-apiserver (+ kube-controller-manager) on loopback.

The control plane is the lab's own (``ciliary.lab.controlplane``) under a separate
prefix and state directory, started once per session and removed afterwards.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliary.lab import controlplane, sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import CONTROL_PLANE_TOOLS, Binaries

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
