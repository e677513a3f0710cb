"""The lab's control plane is real: versions, RBAC, controllers, etcd."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from ciliary.lab import etcdsecurity, tools

pytestmark = pytest.mark.integration


def test_apiserver_reports_its_pinned_version(kube):
    out = kube.kubectl("version", "-o", "json", check=True)
    assert json.loads(out.stdout)["serverVersion"]["gitVersion"] == tools.pinned_version("KUBERNETES_VERSION")


def test_etcd_reports_its_pinned_version(kube):
    context = etcdsecurity.tls_context(kube.etcd_tls())
    with urllib.request.urlopen(f"{kube.etcd_endpoint}/version", timeout=5, context=context) as resp:
        assert "v" + json.load(resp)["etcdserver"] == tools.pinned_version("ETCD_VERSION")


def test_rbac_is_enforced(kube):
    out = kube.kubectl("auth", "can-i", "list", "secrets", "--as", "system:serviceaccount:default:nobody")
    assert out.stdout.strip() == "no"


def test_controller_manager_deletes_namespaces(kube):
    kube.kubectl("create", "namespace", "cy-int-ns", check=True)
    kube.kubectl("create", "configmap", "x", "-n", "cy-int-ns", check=True)
    kube.kubectl("delete", "namespace", "cy-int-ns", "--wait=false", check=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if kube.kubectl("get", "namespace", "cy-int-ns").returncode != 0:
            return
        time.sleep(1)
    pytest.fail("namespace stayed Terminating: kube-controller-manager is not deleting namespaces")


def test_apiserver_reaches_etcd_as_a_confined_user_without_denials(kube):
    """kube-apiserver is etcd user ``kube-apiserver``: it works (kubectl above), etcd never refuses it
    (its compactor's key included), and it cannot read Ciliary's keys."""
    import asyncio

    from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client

    log = kube.lab.layout.log_dir / "kube-apiserver.log"
    kube.kubectl("get", "--raw", "/readyz", check=True)
    assert "permission denied" not in log.read_text(errors="replace")

    async def read_ciliary() -> None:
        client = make_client(EtcdEndpoint.parse(kube.etcd_endpoint), kube.etcd_tls(etcdsecurity.APISERVER_USER), 5)
        try:
            with pytest.raises(Exception, match="permission denied"):
                await client.get(b"/ciliary/intents/v1/node-1")
        finally:
            await client.close()

    asyncio.run(read_ciliary())
