"""The chart's Hubble mutual TLS and the relay's etcd identity, judged from ``helm template``.

The chart generates two CAs whose keys it keeps nowhere: one signs the agents' shared server
certificate (``*.<cluster>.hubble-grpc.cilium.io``, Secret ``-hubble-server-certs``, referenced by agent
pods only), the other the relay's client certificate (``-hubble-relay-client-certs``, operator pod, relay
container only). The generated certificates are then used for real: an Observer API served with the
agents' Secret answers a client holding the relay's Secret, for the name the relay asks, and refuses a
client presenting the agents' own certificate. The relay's etcd pair (``-etcd-relay``, CN ciliary-relay)
is mounted by the relay container alone; ``test_chart_etcd_tls.py`` runs it against a real etcd.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from deploy_helpers import CHART, Helm, documents, find
from test_chart_agent_credentials import references

from ciliary.hubbleapi import observer_pb2, observer_pb2_grpc
from ciliary.nodeagent import flowapi, observer_server, observer_tls

pytestmark = pytest.mark.integration

SERVER_SECRET, CLIENT_SECRET = "cy-ciliary-hubble-server-certs", "cy-ciliary-hubble-relay-client-certs"
ETCD_RELAY = "cy-ciliary-etcd-relay"


def pod(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    return dict(find(docs, kind, suffix)["spec"]["template"])


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def secret_files(docs: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def names(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return list(san.get_values_for_type(x509.DNSName))


def test_agents_and_the_relay_each_reference_only_their_own_hubble_secret(helm: Helm) -> None:
    docs = documents(helm.template())
    agent, operator = pod(docs, "DaemonSet", "-agent"), pod(docs, "Deployment", "-operator")
    assert SERVER_SECRET in set(references(agent, "secret"))
    assert not {CLIENT_SECRET, ETCD_RELAY} & set(references(agent, "secret"))
    operator_refs = set(references(operator, "secret"))
    assert {CLIENT_SECRET, ETCD_RELAY} <= operator_refs and SERVER_SECRET not in operator_refs
    for name in (SERVER_SECRET, CLIENT_SECRET):
        doc = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
        assert doc["type"] == "kubernetes.io/tls" and set(doc["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    # inside the operator pod only the relay container mounts the relay's credentials
    mounts = {c["name"]: {m["name"] for m in c.get("volumeMounts", [])}
              for c in operator["spec"]["containers"] + operator["spec"]["initContainers"]}
    assert {"hubble-tls", "etcd-relay"} <= mounts["relay"] and "etcd-tls" not in mounts["relay"]
    assert [name for name, held in mounts.items() if held & {"hubble-tls", "etcd-relay"}] == ["relay"]
    agent_mounts = {m["name"]: m for m in container(agent, "agent")["volumeMounts"]}
    assert agent_mounts["hubble-tls"] == {"name": "hubble-tls", "mountPath": "/etc/ciliary/hubble-tls",
                                          "readOnly": True}


def test_the_generated_certificates_chain_to_two_distinct_cas(helm: Helm) -> None:
    docs = documents(helm.template())
    server, client = secret_files(docs, SERVER_SECRET), secret_files(docs, CLIENT_SECRET)
    server_cert, relay_cert = cert(server["tls.crt"]), cert(client["tls.crt"])
    server_ca, client_ca = cert(client["ca.crt"]), cert(server["ca.crt"])  # each side holds the other's CA
    assert names(server_cert) == ["*.default.hubble-grpc.cilium.io"]
    server_cert.verify_directly_issued_by(server_ca)
    relay_cert.verify_directly_issued_by(client_ca)
    assert server_ca.subject != client_ca.subject
    with pytest.raises(ValueError):
        server_cert.verify_directly_issued_by(client_ca)  # an agent's key is no client of another agent
    etcd_relay = cert(secret_files(docs, ETCD_RELAY)["tls.crt"])
    assert etcd_relay.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ciliary-relay"
    assert not any(key.endswith(".key") for key in server if key != "tls.key")

    prod = documents(helm.template(CHART, "relay.tls.clusterName=prod"))
    assert names(cert(secret_files(prod, SERVER_SECRET)["tls.crt"])) == ["*.prod.hubble-grpc.cilium.io"]
    relay_env = {e["name"]: e.get("value") for e in container(pod(prod, "Deployment", "-operator"), "relay")["env"]}
    assert relay_env["CILIARY_RELAY_HUBBLE_TLS_CLUSTER"] == "prod"


async def _status_with(server_files: dict[str, Path], client: tuple[bytes, bytes, bytes], name: str) -> Any:
    hub = flowapi.FlowHub("node-1", capacity=16)
    tls = observer_tls.ServerTLS(server_files["tls.crt"], server_files["tls.key"], server_files["ca.crt"])
    port = free_port()
    server = await observer_server.start(hub, f"127.0.0.1:{port}", tls=tls)
    try:
        ca, key, chain = client
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                           options=[("grpc.ssl_target_name_override", name)]) as channel:
            try:
                return await observer_pb2_grpc.ObserverStub(channel).ServerStatus(
                    observer_pb2.ServerStatusRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc
    finally:
        await server.stop(None)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_generated_certificates_make_a_working_mutual_tls_pair(helm: Helm, tmp_path: Path) -> None:
    docs = documents(helm.template())
    server, client = secret_files(docs, SERVER_SECRET), secret_files(docs, CLIENT_SECRET)
    files = {}
    for key, value in server.items():
        files[key] = tmp_path / key
        files[key].write_bytes(value)
    name = observer_tls.server_name("node-1.example.com")
    relay = asyncio.run(_status_with(files, (client["ca.crt"], client["tls.key"], client["tls.crt"]), name))
    assert isinstance(relay, observer_pb2.ServerStatusResponse), relay
    # the agents' own pair presented as a client certificate: not signed by the client CA, refused
    agent_as_client = asyncio.run(_status_with(files, (client["ca.crt"], server["tls.key"], server["tls.crt"]), name))
    assert isinstance(agent_as_client, grpc.aio.AioRpcError)
    other_cluster = asyncio.run(_status_with(files, (client["ca.crt"], client["tls.key"], client["tls.crt"]),
                                             observer_tls.server_name("node-1", "prod")))
    assert isinstance(other_cluster, grpc.aio.AioRpcError), "the relay checks the cluster in the agent's name"


def test_insecure_drops_the_certificates_and_both_sides_say_so(helm: Helm) -> None:
    docs = documents(helm.template(CHART, "agent.hubble.insecure=true"))
    assert not [d for d in docs if d["kind"] == "Secret" and "hubble" in d["metadata"]["name"]]
    agent_env = {e["name"]: e.get("value") for e in container(pod(docs, "DaemonSet", "-agent"), "agent")["env"]}
    assert agent_env["CILIARY_AGENT_HUBBLE_INSECURE"] == "on" and "CILIARY_AGENT_HUBBLE_TLS_CERT_FILE" not in agent_env
    assert "--hubble-insecure" in container(pod(docs, "Deployment", "-operator"), "relay")["args"]


def test_existing_hubble_secrets_go_together_and_replace_the_generated_ones(helm: Helm) -> None:
    docs = documents(helm.template(CHART, "relay.tls.existingServerSecret=my-hubble-server",
                                   "relay.tls.existingClientSecret=my-hubble-relay"))
    assert not [d for d in docs if d["kind"] == "Secret" and "hubble" in d["metadata"]["name"]]
    assert "my-hubble-server" in set(references(pod(docs, "DaemonSet", "-agent"), "secret"))
    operator_refs = set(references(pod(docs, "Deployment", "-operator"), "secret"))
    assert "my-hubble-relay" in operator_refs and "my-hubble-server" not in operator_refs
    alone = helm.run("template", "cy", str(CHART), "--set", "relay.tls.existingServerSecret=x", check=False)
    assert alone.returncode != 0 and "go together" in alone.stderr


def test_without_the_relay_no_hubble_or_relay_secret_and_no_plaintext_off_loopback(helm: Helm) -> None:
    docs = documents(helm.template(CHART, "relay.enabled=false", "ui.server=relay.example:4245"))
    assert not [d for d in docs if d["kind"] == "Secret" and ("hubble" in d["metadata"]["name"]
                                                            or d["metadata"]["name"] == ETCD_RELAY)]
    refused = helm.run("template", "cy", str(CHART), "--set", "relay.enabled=false", "--set",
                       "ui.server=r:4245", "--set", "agent.hubble.listenAddress=10.0.0.1:4244", check=False)
    assert refused.returncode != 0 and "agent.hubble.insecure" in refused.stderr
    told = documents(helm.template(CHART, "relay.enabled=false", "ui.server=r:4245",
                                   "agent.hubble.listenAddress=10.0.0.1:4244", "agent.hubble.insecure=true"))
    env = {e["name"]: e.get("value") for e in container(pod(told, "DaemonSet", "-agent"), "agent")["env"]}
    assert env["CILIARY_AGENT_HUBBLE_ADDR"] == "10.0.0.1:4244" and env["CILIARY_AGENT_HUBBLE_INSECURE"] == "on"


def test_an_existing_etcd_secret_needs_a_relay_secret_of_its_own(helm: Helm) -> None:
    base = ("etcd.tls.existingSecret=my-etcd-tls", "etcd.tls.existingCASecret=my-etcd-ca",
            "etcd.tls.existingCAConfigMap=my-etcd-ca-cert")
    refused = helm.run("template", "cy", str(CHART), *[a for s in base for a in ("--set", s)], check=False)
    assert refused.returncode != 0 and "existingRelaySecret" in refused.stderr
    docs = documents(helm.template(CHART, *base, "etcd.tls.existingRelaySecret=my-etcd-relay"))
    relay = container(pod(docs, "Deployment", "-operator"), "relay")
    volumes = {v["name"]: v for v in pod(docs, "Deployment", "-operator")["spec"]["volumes"]}
    assert volumes["etcd-relay"]["secret"]["secretName"] == "my-etcd-relay"
    assert "etcd-relay" in {m["name"] for m in relay["volumeMounts"]}
