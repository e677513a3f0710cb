"""The rendered charts against the real kube-apiserver: server-side dry-run of every object, and
install-cni.py reading its Node's podCIDR with the chart's agent ServiceAccount."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    CHART,
    NAMESPACE,
    Helm,
    documents,
    ensure_namespace,
    install_crds,
    kubectl_ok,
    service_account_kubeconfig,
)

pytestmark = pytest.mark.integration

INSTALL_CNI = CHART / "files" / "install-cni.py"


@pytest.fixture(scope="module")
def cluster(kube: Any, helm: Helm) -> Any:
    install_crds(kube, helm)
    ensure_namespace(kube, NAMESPACE)
    return kube


VARIANTS = {
    "default": (),
    "external-etcd": ("etcd.enabled=false", "etcd.external.endpoints={https://etcd-0.example:2379}",
                      "etcd.external.tls.secretName=ciliary-etcd-client"),
    "ha-direct-status-no-cni": ("operator.replicas=2", "operator.leaderElection.enabled=true",
                                "agent.directStatus=true", "cni.install=false", "etcd.persistence.enabled=false"),
    "shared-agents": ("etcd.nodeEnrollment.enabled=false",),
    "existing-secret": ("etcd.tls.existingSecret=my-etcd-tls", "etcd.tls.existingCASecret=my-etcd-ca",
                        "etcd.tls.existingCAConfigMap=my-etcd-ca-cert", "etcd.tls.existingRelaySecret=my-etcd-relay"),
    "existing-secret-shared-agents": ("etcd.tls.existingSecret=my-etcd-tls", "etcd.nodeEnrollment.enabled=false",
                                      "etcd.tls.existingAgentsSecret=my-etcd-agents",
                                      "etcd.tls.existingRelaySecret=my-etcd-relay"),
    "ui-without-relay": ("relay.enabled=false", "ui.server=relay.example:4245",
                         "operator.prometheusServeAddr=$(CILIARY_OPERATOR_POD_IP):9963"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_chart_is_accepted_by_the_apiserver(cluster: Any, helm: Helm, variant: str) -> None:
    rendered = helm.template(CHART, *VARIANTS[variant])
    kinds = sorted({d["kind"] for d in documents(rendered)})
    assert {"ClusterRole", "ClusterRoleBinding", "DaemonSet", "Deployment", "ServiceAccount"} <= set(kinds)
    done = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(documents(rendered))


def test_crds_chart_serves_the_policy_kinds(cluster: Any) -> None:
    out = kubectl_ok(cluster, "get", "crd", "ciliumnetworkpolicies.cilium.io", "-o", "json")
    crd = json.loads(out)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def _apply_agent_rbac(kube: Any, helm: Helm) -> None:
    wanted = [d for d in documents(helm.template()) if d["kind"] in ("ServiceAccount", "ClusterRole",
                                                                     "ClusterRoleBinding")
              and d["metadata"]["name"].endswith("-agent")]
    assert len(wanted) == 3
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": wanted}))


def _run_install_cni(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", str(INSTALL_CNI)], env=env, text=True, capture_output=True,
                          timeout=60)


def test_install_cni_writes_wrapper_runtime_and_conflist(cluster: Any, helm: Helm, tmp_path: Path) -> None:
    _apply_agent_rbac(cluster, helm)
    node = "deploy-cni-node"
    kubectl_ok(cluster, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "spec": {"podCIDR": "10.250.7.0/24", "podCIDRs": ["10.250.7.0/24"]}}))
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "agent.kubeconfig", account="cy-ciliary-agent",
                                            namespace=NAMESPACE)
    config = yaml.safe_load(kubeconfig.read_text())
    (tmp_path / "token").write_text(config["users"][0]["user"]["token"])
    (tmp_path / "ca.crt").write_bytes(base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]))
    source = tmp_path / "image" / "opt" / "ciliary-cni"
    (source / "python" / "bin").mkdir(parents=True)
    (source / "python" / "bin" / "python3").write_text("#!/bin/sh\n")
    host = tmp_path / "host"
    cm = next(d for d in documents(helm.template()) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-cni"))
    (tmp_path / "conflist.template").write_text(cm["data"]["conflist.template"])
    env = {
        "PATH": os.environ["PATH"],
        "CILIARY_NODE_NAME": node,
        "CILIARY_API_SERVER": config["clusters"][0]["cluster"]["server"],
        "CILIARY_API_TOKEN_FILE": str(tmp_path / "token"),
        "CILIARY_API_CA_FILE": str(tmp_path / "ca.crt"),
        "CILIARY_CNI_BIN_DIR": str(host / "opt/cni/bin"),
        "CILIARY_CNI_CONF_DIR": str(host / "etc/cni/net.d"),
        "CILIARY_CNI_RUNTIME_DIR": str(host / "opt/ciliary"),
        "CILIARY_CNI_HOST_RUNTIME_DIR": "/opt/ciliary",
        "CILIARY_CNI_RUNTIME_SOURCE": str(source),
        "CILIARY_CNI_CONF_TEMPLATE": str(tmp_path / "conflist.template"),
        "CILIARY_CNI_WAIT_SECONDS": "5",
    }
    done = _run_install_cni(env)
    assert done.returncode == 0, done.stderr
    conflist = json.loads((host / "etc/cni/net.d/05-ciliary.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["subnet"] == "10.250.7.0/24"
    assert conflist["plugins"][0]["type"] == "ciliary-cni"
    runtimes = sorted(p.name for p in (host / "opt/ciliary").iterdir())
    assert len(runtimes) == 1 and runtimes[0].startswith("cni-")
    wrapper = (host / "opt/cni/bin/ciliary-cni")
    assert os.access(wrapper, os.X_OK)
    assert f"exec /opt/ciliary/{runtimes[0]}/python/bin/python3 -I -m ciliary.cni.main" in wrapper.read_text()

    # a new image: the new runtime is installed, the previous one kept (in-flight ADDs), older ones removed
    (host / "opt/ciliary/cni-000000000000/python/bin").mkdir(parents=True)
    (source / "python" / "bin" / "python3").write_text("#!/bin/sh\n# v2\n")
    done = _run_install_cni(env)
    assert done.returncode == 0, done.stderr
    now = sorted(p.name for p in (host / "opt/ciliary").iterdir())
    assert len(now) == 2 and runtimes[0] in now and "cni-000000000000" not in now

    # without the ClusterRole the read is refused, and install-cni says so instead of waiting
    kubectl_ok(cluster, "delete", "clusterrolebinding", "cy-ciliary-agent")
    try:
        refused = _run_install_cni(env)
        assert refused.returncode != 0 and "403" in refused.stderr
    finally:
        _apply_agent_rbac(cluster, helm)
        kubectl_ok(cluster, "delete", "node", node, "--wait=false")
