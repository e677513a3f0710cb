"""Helpers for the deployment tests: the helm binary, chart rendering, and apiserver helpers.

helm is built by the set-up (``setup/build-go-tools.sh``); the ``tool`` fixture
(root conftest, ``ciliary.lab.tools``) finds it at the version ``setup/versions.env`` pins.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "ciliary"
CRDS_CHART = ROOT / "charts" / "ciliary-crds"
RELEASE = "cy"
NAMESPACE = "ciliary-system"


@dataclass
class Helm:
    binary: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.binary), *args], text=True, capture_output=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {done.stderr}")
        return done

    def template(self, chart: Path = CHART, *sets: str, namespace: str = NAMESPACE) -> str:
        args = ["template", RELEASE, str(chart), "--namespace", namespace]
        for item in sets:
            args += ["--set", item]
        return self.run(*args).stdout


def etcd_value(kube: Any, key: str) -> bytes | None:
    """One key's value, read over mutual TLS as the operator's etcd user; None when absent.

    (etcd's JSON gateway cannot be used: it does not pass the client certificate on, so
    with authentication on it sees no user.)"""

    async def read() -> bytes | None:
        store = kube.etcd_store()
        try:
            got = await store.get(key.encode())
            return None if got is None else bytes(got.value)
        finally:
            await store.close()

    return asyncio.run(read())


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"].endswith(suffix):
            return doc
    raise KeyError(f"{kind} *{suffix}")


def kubectl_ok(kube: Any, *args: str, input: str | None = None) -> str:
    done = kube.kubectl(*args, input=input)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return str(done.stdout)


def install_crds(kube: Any, helm: Helm) -> None:
    """The CRDs as the ciliary-crds chart renders them, applied and established."""
    kubectl_ok(kube, "apply", "--server-side", "--force-conflicts", "-f", "-", input=helm.template(CRDS_CHART))
    for _ in range(60):
        done = kube.kubectl("wait", "--for", "condition=Established", "--timeout=30s",
                            "crd/ciliumnetworkpolicies.cilium.io", "crd/ciliumclusterwidenetworkpolicies.cilium.io")
        if done.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"CRDs not established: {done.stderr}")


def ensure_namespace(kube: Any, name: str) -> None:
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))


def service_account_kubeconfig(kube: Any, path: Path, *, account: str, namespace: str) -> Path:
    """A kubeconfig that authenticates as ``namespace/account`` with a freshly minted token."""
    token = kubectl_ok(kube, "create", "token", account, "-n", namespace, "--duration=2h").strip()
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority-data") or base64.b64encode(
        Path(cluster["certificate-authority"]).read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": cluster["server"], "certificate-authority-data": ca}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "lab", "user": account, "namespace": namespace}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
