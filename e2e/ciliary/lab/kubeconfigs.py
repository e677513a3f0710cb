"""Kubeconfig files for the lab's users (certificate data embedded, as kopf expects)."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, *, server: str, pki: Path, user: str) -> None:
    """Write a kubeconfig for client certificate ``<pki>/<user>.crt``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ciliary-lab", "cluster": {
            "server": server, "certificate-authority-data": _b64(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": _b64(pki / f"{user}.crt"),
            "client-key-data": _b64(pki / f"{user}.key")}}],
        "contexts": [{"name": "ciliary-lab", "context": {"cluster": "ciliary-lab", "user": user}}],
        "current-context": "ciliary-lab",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
