"""Status handover against a real etcd and kube-apiserver.

A CNP is created; two "agents" (leases + PolicyReports written straight into
etcd, with the NodeIntents the operator would have published) report it
enforced. The handover component writes ``.status.nodes`` and ``Enforced=True``
(``kubectl wait`` sees it) in a bounded number of status writes, counted by
kube-apiserver's own metrics; revoking one lease removes that node's entry and
turns ``Enforced`` False; a restarted handover writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aetcd
import pytest

from ciliary.operator.intents import NodeIntent, PolicyRef
from ciliary.operator.kube import kubeapi
from ciliary.operator.status.handover import StatusHandover
from ciliary.operator.status.reports import PolicyReport
from ciliary.operator.store import access
from ciliary.operator.store.etcdclient import EtcdStore
from ciliary.operator.store.keyspace import node_intent_key, report_key

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
NS, NAME = "handover-it", "hv-policy"
NODES = ("hv-a", "hv-b")
INTERVAL = 0.3
CNP = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {NAME}, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: hv}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
"""


def status_patches(kube: Any) -> int:
    """PATCH requests on ciliumnetworkpolicies/status served so far (kube-apiserver's own counter)."""
    pki = kube.lab.layout.pki_dir
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(f"{kube.ports.apiserver_url}/metrics", context=ctx, timeout=10) as resp:
        text = resp.read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="ciliumnetworkpolicies"' in line \
                and 'subresource="status"' in line and 'verb="PATCH"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def kubectl_json(kube: Any, *args: str) -> Any:
    done = kube.kubectl(*args, "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def until(what: str, check: Callable[[], Any], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def cnp(kube: Any) -> Any:
    for crd in sorted((ROOT / "crds").glob("*.cilium.io.yaml")):
        done = kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        assert done.returncode == 0, done.stderr
    for _ in range(30):
        if kube.kubectl("wait", "--for", "condition=Established", "--timeout=30s",
                        "crd/ciliumnetworkpolicies.cilium.io").returncode == 0:
            break
        time.sleep(1)
    kube.kubectl("create", "namespace", NS)
    kube.kubectl("delete", "cnp", "-n", NS, NAME, "--ignore-not-found", "--wait=true")
    done = kube.kubectl("apply", "-f", "-", input=CNP)
    assert done.returncode == 0, done.stderr
    body = kubectl_json(kube, "get", "cnp", "-n", NS, NAME)
    yield body
    kube.kubectl("delete", "cnp", "-n", NS, NAME, "--ignore-not-found")


class PolicyFeed:
    """Stands in for kopf's policy watch: polls the object and hands it to the handover."""

    def __init__(self, api: Any, handover: StatusHandover) -> None:
        from kubernetes_asyncio import client

        self.custom = client.CustomObjectsApi(api)
        self.handover = handover

    async def once(self) -> None:
        body = await self.custom.get_namespaced_custom_object("cilium.io", "v2", NS, "ciliumnetworkpolicies", NAME)
        self.handover.observe_policy(body)

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(0.1)


@pytest.fixture
async def etcd(kube: Any) -> AsyncIterator[EtcdStore]:
    """The test's own view of etcd (root: it plays the operator's intents and every agent's reports)."""
    store = kube.etcd_store(access.ROOT_USER)
    yield store
    for node in NODES:
        await store.delete(node_intent_key(node).encode())
    await store.call(lambda c: c.delete_prefix(b"/ciliary/reports/v1/"))
    await store.close()


async def start(kube: Any, store: EtcdStore) -> tuple[StatusHandover, list[asyncio.Task[Any]], Any]:
    """A handover reading etcd as the operator's etcd user (``store`` is the test's own)."""
    api = await kubeapi.api_client(kube.kubeconfig)
    handover = StatusHandover(kube.etcd_store(), api, interval=INTERVAL)
    feed = PolicyFeed(api, handover)
    await feed.once()
    handover.policies_listed.set()
    tasks = [asyncio.create_task(handover.run()), asyncio.create_task(feed.run())]
    return handover, tasks, api


async def stop(tasks: list[asyncio.Task[Any]], api: Any, handover: StatusHandover) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await api.close()
    await handover.report_mirror.store.close()


async def test_handover_writes_status_nodes_and_enforced(kube: Any, cnp: Any, etcd: EtcdStore) -> None:
    uid, gen = cnp["metadata"]["uid"], cnp["metadata"]["generation"]
    ref = PolicyRef(kind="CiliumNetworkPolicy", namespace=NS, name=NAME, uid=uid, generation=gen)
    leases: dict[str, aetcd.Lease] = {}
    for node in NODES:
        await etcd.put(node_intent_key(node).encode(), NodeIntent(node=node, revision=3, policies=(ref,)).to_wire())
        leases[node] = await etcd.call(lambda c: c.lease(60))
        report = PolicyReport(node=node, policy_uid=uid, kind="CiliumNetworkPolicy", namespace=NS, name=NAME,
                              generation=gen, ok=True, enforcing=True, last_updated="2025-01-01T00:00:00Z",
                              local_policy_revision=3)
        await etcd.put(report_key(uid, node).encode(), report.to_wire(), lease=leases[node])
    before = status_patches(kube)

    handover, tasks, api = await start(kube, etcd)
    try:
        done = await asyncio.to_thread(kube.kubectl, "wait", "--for=condition=Enforced", "-n", NS,
                                       f"cnp/{NAME}", "--timeout=30s")
        assert done.returncode == 0, done.stderr
        status = await until("both node entries", lambda: (
            s if set((s := kubectl_json(kube, "get", "cnp", "-n", NS, NAME).get("status", {}))
                     .get("nodes", {})) == set(NODES) else None))
        assert status["nodes"]["hv-a"] == {"ok": True, "enforcing": True, "lastUpdated": "2025-01-01T00:00:00Z",
                                           "localPolicyRevision": 3}
        assert status["enforcement"] == "2/2 nodes"
        # the handover's positive signal first: nothing pending and no write in flight
        await asyncio.wait_for(handover.settled.wait(), 30)
        writes = status_patches(kube) - before
        assert 1 <= writes <= 2, writes  # one write carries both nodes; at most one more (a racing event)
        assert handover.stats.writes == writes

        # an agent goes away: its lease (and so its report) vanishes
        await leases["hv-b"].revoke()

        def enforced_false() -> Any:
            s = kubectl_json(kube, "get", "cnp", "-n", NS, NAME)["status"]
            cond = next(c for c in s["conditions"] if c["type"] == "Enforced")
            return s if set(s["nodes"]) == {"hv-a"} and cond["status"] == "False" else None

        status = await until("hv-b's entry to go and Enforced to turn False", enforced_false)
        cond = next(c for c in status["conditions"] if c["type"] == "Enforced")
        assert "hv-b (no report)" in cond["message"] and status["enforcement"] == "1/2 nodes"
    finally:
        await stop(tasks, api, handover)

    # a restarted handover sees the same picture and writes nothing
    rv = kubectl_json(kube, "get", "cnp", "-n", NS, NAME)["metadata"]["resourceVersion"]
    before = status_patches(kube)
    handover, tasks, api = await start(kube, etcd)
    try:
        # it looked at the policy (the positive signal) before "it wrote nothing" is asserted
        await asyncio.wait_for(handover.settled.wait(), 30)
        assert handover.started.is_set() and "hv-a" in (handover.desired(uid).nodes or {})
        assert handover.stats.writes == 0
    finally:
        await stop(tasks, api, handover)
    assert status_patches(kube) == before
    assert kubectl_json(kube, "get", "cnp", "-n", NS, NAME)["metadata"]["resourceVersion"] == rv
    await leases["hv-a"].revoke()
    assert re.fullmatch(r"\d+", rv)
