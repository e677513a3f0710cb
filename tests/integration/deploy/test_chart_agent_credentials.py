"""What a node can read through its agent pods, and who can reach the bundled etcd's peer port.

The Kubernetes node authorizer lets a node's kubelet read every Secret (and ConfigMap) that a pod
bound to that node references, the whole object whatever ``items:`` selects. So, in every
configuration of the bundled etcd, the agent DaemonSet's pod template must reference no Secret
holding a key other than the shared agents' own pair: not the generated ``<release>-etcd-tls``
(server, root and operator keys) or ``-etcd-ca`` (the CA key), nor ``etcd.tls.existingSecret`` or
``etcd.tls.existingCASecret`` (which hold those by contract). The references are collected by
walking the whole pod template (volumes, projected sources, env and envFrom of every container).
The bundled single-member etcd's peer URL (plain http, no peer authentication) is loopback only.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from deploy_helpers import CHART, Helm, documents, find

pytestmark = pytest.mark.integration

USER_SECRETS = ("etcd.tls.existingSecret=my-etcd-tls", "etcd.tls.existingCASecret=my-etcd-ca")
CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "default": (),
    "existing-secret": (*USER_SECRETS, "etcd.tls.existingCAConfigMap=my-etcd-ca-cert",
                        "etcd.tls.existingRelaySecret=my-etcd-relay"),
    "enrollment-disabled": ("etcd.nodeEnrollment.enabled=false",),
    "existing-secret-enrollment-disabled": (*USER_SECRETS, "etcd.nodeEnrollment.enabled=false",
                                            "etcd.tls.existingAgentsSecret=my-etcd-agents",
                                            "etcd.tls.existingRelaySecret=my-etcd-relay"),
}
# keys no node may read: any etcd user's key but the shared agents' own, and the CA key
FORBIDDEN_KEYS = {"root.key", "operator.key", "server.key", "ca.key", "agent.key"}
# the user-supplied Secrets that hold such keys by contract (values.yaml, etcd.tls)
FORBIDDEN_USER_SECRETS = {"my-etcd-tls", "my-etcd-ca", "my-etcd-relay"}
AGENT_SECRET_KEYS = {"ca.crt", "tls.crt", "tls.key"}
HUBBLE_SERVER = "cy-ciliary-hubble-server-certs"
"""The agents' own Observer API certificate (test_chart_hubble_tls.py): no etcd key in it."""


def references(node: Any, kind: str) -> Iterator[str]:
    """Names of every Secret (kind "secret") or ConfigMap (kind "configMap") a pod template refers to:
    volumes and projected sources ({secret|configMap: {secretName|name}}), env valueFrom
    ({secretKeyRef|configMapKeyRef: {name}}) and envFrom ({secretRef|configMapRef: {name}})."""
    if isinstance(node, list):
        for item in node:
            yield from references(item, kind)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in (kind, f"{kind}KeyRef", f"{kind}Ref") and isinstance(value, dict):
            name = value.get("secretName") or value.get("name")
            assert name, f"a {key} without a name: {value}"
            yield str(name)
        yield from references(value, kind)


def pod_template(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    return dict(find(docs, kind, suffix)["spec"]["template"])


def rendered_data(docs: list[dict[str, Any]], kind: str) -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("data", {})) for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    return {name: documents(helm.template(CHART, *sets)) for name, sets in CONFIGURATIONS.items()}


def test_the_reference_walk_finds_secrets_wherever_a_pod_names_them(rendered: dict[str, Any]) -> None:
    # the operator pod does reference the generated etcd-tls Secret (its own and root's pair) and the CA Secret
    operator = pod_template(rendered["default"], "Deployment", "-operator")
    assert set(references(operator, "secret")) == {"cy-ciliary-etcd-tls", "cy-ciliary-etcd-ca", "cy-ciliary-etcd-relay",
                                                   "cy-ciliary-hubble-relay-client-certs"}
    sample = {"spec": {"volumes": [{"projected": {"sources": [{"secret": {"name": "a"}}]}}],
                       "containers": [{"env": [{"valueFrom": {"secretKeyRef": {"name": "b", "key": "k"}}}],
                                       "envFrom": [{"secretRef": {"name": "c"}}]}],
                       "initContainers": [{"envFrom": [{"configMapRef": {"name": "d"}}]}]}}
    assert sorted(references(sample, "secret")) == ["a", "b", "c"]
    assert list(references(sample, "configMap")) == ["d"]


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_agent_pods_reference_no_secret_with_another_users_key(
        rendered: dict[str, list[dict[str, Any]]], configuration: str) -> None:
    docs = rendered[configuration]
    agent = pod_template(docs, "DaemonSet", "-agent")
    secrets, config_maps = rendered_data(docs, "Secret"), rendered_data(docs, "ConfigMap")
    referenced = set(references(agent, "secret"))
    for name in referenced:
        assert name not in FORBIDDEN_USER_SECRETS, f"{configuration}: agent pods reference {name}"
        if name in secrets:  # rendered by the chart: its keys are known
            assert secrets[name] <= AGENT_SECRET_KEYS, (configuration, name, secrets[name])
            assert not secrets[name] & FORBIDDEN_KEYS
    for name in references(agent, "configMap"):
        if name in config_maps:
            assert not any(k.endswith(".key") for k in config_maps[name]), (configuration, name)
    # every Secret the chart renders with a forbidden key is referenced by no agent pod
    holders = {name for name, keys in secrets.items() if keys & FORBIDDEN_KEYS}
    assert holders & referenced == set()
    if "etcd.tls.existingSecret=my-etcd-tls" not in CONFIGURATIONS[configuration]:
        assert "cy-ciliary-etcd-tls" in holders  # the check above had something to find


def test_enrolled_agents_trust_etcd_through_a_ca_only_config_map(rendered: dict[str, Any]) -> None:
    for configuration, config_map in (("default", "cy-ciliary-etcd-ca-cert"), ("existing-secret", "my-etcd-ca-cert")):
        agent = pod_template(rendered[configuration], "DaemonSet", "-agent")
        volume = next(v for v in agent["spec"]["volumes"] if v["name"] == "etcd-tls")
        assert volume == {"name": "etcd-tls", "configMap": {"name": config_map, "defaultMode": 0o444,
                                                            "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
        assert set(references(agent, "secret")) == {HUBBLE_SERVER}, "no etcd Secret"
    generated = find(rendered["default"], "ConfigMap", "-etcd-ca-cert")
    assert set(generated["data"]) == {"ca.crt"}


def test_shared_agents_get_a_secret_of_their_own(rendered: dict[str, Any]) -> None:
    docs = rendered["enrollment-disabled"]
    agents = find(docs, "Secret", "-etcd-agents")
    assert set(agents["data"]) == AGENT_SECRET_KEYS
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], check=True, capture_output=True, text=True,
                             input=base64.b64decode(agents["data"]["tls.crt"]).decode()).stdout
    assert "CN = ciliary-agents" in subject or "CN=ciliary-agents" in subject
    tls = find(docs, "Secret", "-etcd-tls")["data"]
    assert "agent.crt" not in tls and "agent.key" not in tls
    assert agents["data"]["ca.crt"] == tls["ca.crt"]
    agent = pod_template(docs, "DaemonSet", "-agent")
    assert set(references(agent, "secret")) == {"cy-ciliary-etcd-agents", HUBBLE_SERVER}
    user = pod_template(rendered["existing-secret-enrollment-disabled"], "DaemonSet", "-agent")
    assert set(references(user, "secret")) == {"my-etcd-agents", HUBBLE_SERVER}
    assert not [d for d in rendered["existing-secret-enrollment-disabled"]
                if d["kind"] == "Secret" and "-hubble-" not in d["metadata"]["name"]], "no etcd Secret generated"


@pytest.mark.parametrize(("sets", "needed"), [
    ((*USER_SECRETS, "etcd.tls.existingRelaySecret=r"), "etcd.tls.existingCAConfigMap"),
    (("etcd.tls.existingSecret=my-etcd-tls", "etcd.nodeEnrollment.enabled=false", "etcd.tls.existingRelaySecret=r"),
     "etcd.tls.existingAgentsSecret"),
], ids=["enrolled", "shared-agents"])
def test_existing_secret_without_an_agent_only_source_is_refused(helm: Helm, sets: tuple[str, ...],
                                                                 needed: str) -> None:
    args = ["template", "x", str(CHART)]
    for item in sets:
        args += ["--set", item]
    refused = helm.run(*args, check=False)
    assert refused.returncode != 0 and needed in refused.stderr, refused.stderr
    assert "root, operator and server keys" in refused.stderr


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_etcd_peer_url_is_loopback_only(rendered: dict[str, list[dict[str, Any]]], configuration: str) -> None:
    docs = rendered[configuration]
    etcd = find(docs, "StatefulSet", "-etcd")["spec"]["template"]["spec"]["containers"][0]
    flags = dict(a.split("=", 1) for a in etcd["command"][1:] if "=" in a)
    peer_urls = [flags["--listen-peer-urls"], flags["--initial-advertise-peer-urls"],
                 flags["--initial-cluster"].split("=", 1)[1]]
    for url in peer_urls:
        assert urlsplit(url).hostname == "127.0.0.1", url
    assert "peer" not in {p["name"] for p in etcd["ports"]}
    assert "ports" not in find(docs, "Service", "-etcd-peers")["spec"]
    # the metrics listener stays on the pod IP only because the kubelet's probes connect there
    assert urlsplit(flags["--listen-metrics-urls"]).port == 2381
    assert {etcd["livenessProbe"]["httpGet"]["port"], etcd["readinessProbe"]["httpGet"]["port"]} == {"metrics"}
    assert {p["name"]: p["containerPort"] for p in etcd["ports"]}["metrics"] == 2381
