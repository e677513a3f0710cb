"""Upgrading a release whose shared agent pair lived in ``<release>-etcd-tls``: the chart, reading
the cluster with ``lookup`` (``helm template --dry-run=server`` against the real kube-apiserver),
moves that pair into ``<release>-etcd-agents`` and drops it from the Secret agents no longer mount,
then keeps it across further upgrades; without a pair or a CA key to issue one it refuses to render.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_helpers import CHART, RELEASE, Helm, documents, ensure_namespace, find, kubectl_ok

pytestmark = pytest.mark.integration

SHARED = "etcd.nodeEnrollment.enabled=false"


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    """A namespace of this test alone (a deleted one may linger while terminating), emptied afterwards."""
    name = f"ciliary-upgrade-{uuid.uuid4().hex[:8]}"
    ensure_namespace(kube, name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "secrets", "--all", "-n", name)
        kube.kubectl("delete", "namespace", name, "--wait=false")


def render_with_lookup(kube: Any, helm: Helm, namespace: str, *sets: str, check: bool = True) -> Any:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--dry-run=server",
            "--kubeconfig", str(kube.kubeconfig)]
    for item in sets:
        args += ["--set", item]
    return helm.run(*args, check=check)


def apply_secret(kube: Any, namespace: str, name: str, data: dict[str, str]) -> None:
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace}, "data": data}))


def test_the_shared_agent_pair_moves_to_its_own_secret_and_stays(kube: Any, helm: Helm, namespace: str) -> None:
    fresh = documents(helm.template(CHART, SHARED, namespace=namespace))
    tls, agents = find(fresh, "Secret", "-etcd-tls")["data"], find(fresh, "Secret", "-etcd-agents")["data"]
    old = {**tls, "agent.crt": agents["tls.crt"], "agent.key": agents["tls.key"]}  # the layout before
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-tls", old)
    # the relay's etcd pair as a release that had it left it (without it: the refusal tested below)
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-relay", find(fresh, "Secret", "-etcd-relay")["data"])

    upgraded = documents(render_with_lookup(kube, helm, namespace, SHARED).stdout)
    assert find(upgraded, "Secret", "-etcd-tls")["data"] == tls, "kept, without the agent pair"
    moved = find(upgraded, "Secret", "-etcd-agents")["data"]
    assert moved == {"ca.crt": tls["ca.crt"], "tls.crt": agents["tls.crt"], "tls.key": agents["tls.key"]}

    # once the agents' Secret exists, later upgrades keep it as it is
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-tls", tls)
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-agents", moved)
    again = documents(render_with_lookup(kube, helm, namespace, SHARED).stdout)
    assert find(again, "Secret", "-etcd-agents")["data"] == moved
    assert find(again, "Secret", "-etcd-tls")["data"] == tls


def test_no_agent_pair_and_no_ca_key_is_refused(kube: Any, helm: Helm, namespace: str) -> None:
    tls = find(documents(helm.template(CHART, SHARED, namespace=namespace)), "Secret", "-etcd-tls")["data"]
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-tls", tls)
    refused = render_with_lookup(kube, helm, namespace, SHARED, check=False)
    assert refused.returncode != 0 and "cannot issue the ciliary-agents certificate" in refused.stderr, refused.stderr


def test_no_relay_pair_and_no_ca_key_is_refused(kube: Any, helm: Helm, namespace: str) -> None:
    """A release installed before the relay had its own etcd user, with enrollment off (no CA key kept): the
    relay's certificate cannot be issued, and the chart says so rather than falling back to the operator's."""
    fresh = documents(helm.template(CHART, SHARED, namespace=namespace))
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-tls", find(fresh, "Secret", "-etcd-tls")["data"])
    apply_secret(kube, namespace, f"{RELEASE}-ciliary-etcd-agents", find(fresh, "Secret", "-etcd-agents")["data"])
    refused = render_with_lookup(kube, helm, namespace, SHARED, check=False)
    assert refused.returncode != 0 and "cannot issue the ciliary-relay etcd certificate" in refused.stderr, \
        refused.stderr
    assert "relay.enabled=false" in refused.stderr
