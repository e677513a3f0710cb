"""The chart's etcd security, run for real: its generated certificates, etcd flags and bootstrap.

Renders the chart, writes out the Secret it generates, starts a real etcd with the flags the
StatefulSet gives it, runs the operator pod's ``etcd-bootstrap`` init container command with the
root certificate, and checks what each certificate may then do: the operator's, a node certificate
signed with the chart's CA key the way the etcd-enroller signs it (per-node enrollment, the default;
``test_node_enrollment.py`` runs the enrollment itself), and, with ``etcd.nodeEnrollment.enabled=false``,
the shared ``ciliary-agents`` user, pinned so that a change to that weaker matrix is a conscious one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from deploy_helpers import CHART, ROOT, Helm, documents, find

from ciliary.lab.etcdsecurity import tls_context
from ciliary.lab.layout import Binaries
from ciliary.operator.store import access, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, make_client

pytestmark = pytest.mark.integration
PYTHONPATH = ":".join(str(ROOT / d) for d in ("operator", "nodeagent", "e2e"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChartEtcd:
    """A real etcd run with the chart's flags and generated certificates (paths mapped to a temp dir)."""

    def __init__(self, helm: Helm, *sets: str) -> None:
        self.docs = documents(helm.template(CHART, *sets))
        self.dir = Path(tempfile.mkdtemp(prefix="cyt-chart-etcd-"))
        secret = find(self.docs, "Secret", "-etcd-tls")
        for name, value in secret["data"].items():
            (self.dir / name).write_bytes(base64.b64decode(value))
            (self.dir / name).chmod(0o600)
        # etcd.nodeEnrollment.enabled=false: the shared agents' pair, in a Secret of its own
        # and the Hubble relay's pair (user ciliary-relay) and the CLI's (ciliary-reader), in Secrets of their own
        for suffix, user in (("-etcd-agents", "agent"), ("-etcd-relay", "relay"), ("-etcd-reader", "reader")):
            for doc in [d for d in self.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith(suffix)]:
                for name, value in doc["data"].items():
                    target = self.dir / name.replace("tls.", f"{user}.")
                    target.write_bytes(base64.b64decode(value))
                    target.chmod(0o600)
        sts = find(self.docs, "StatefulSet", "-etcd")
        self.args = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        self.port, peer = free_port(), free_port()
        self.endpoint = f"https://127.0.0.1:{self.port}"
        tls_flags = [a.replace("/etc/etcd/tls/", f"{self.dir}/") for a in self.args
                     if a.startswith(("--cert-file", "--key-file", "--trusted-ca-file", "--client-cert-auth"))]
        # the chart's own member name and peer flags (loopback), on a free port instead of 2380
        peer_flags = [a.replace("$(POD_NAME)", "chart-etcd-0").replace(":2380", f":{peer}") for a in self.args
                      if a.startswith(("--name", "--listen-peer-urls", "--initial-advertise-peer-urls",
                                       "--initial-cluster="))]
        assert len(peer_flags) == 4, self.args
        # the chart's history and memory bounds, so this etcd binary refuses them if it does not know them
        memory_flags = [a for a in self.args if a.startswith(("--auto-compaction-", "--snapshot-"))]
        assert sorted(a.split("=")[0] for a in memory_flags) == [
            "--auto-compaction-mode", "--auto-compaction-retention", "--snapshot-catchup-entries", "--snapshot-count"]
        assert "--snapshot-count=1000" in memory_flags, memory_flags
        self.log = open(self.dir / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            [str(Binaries.discover().etcd), "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint, *tls_flags,
             *peer_flags, *memory_flags, "--listen-metrics-urls", "http://127.0.0.1:0", "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def tls(self, name: str) -> EtcdTLS:
        return EtcdTLS(self.dir / "ca.crt", self.dir / f"{name}.crt", self.dir / f"{name}.key")

    def wait_healthy(self) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=2,
                                            context=tls_context(self.tls("root"))) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("etcd with the chart's certificates never became healthy")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def chart_etcd(helm: Helm) -> Iterator[ChartEtcd]:
    etcd = ChartEtcd(helm)
    try:
        etcd.wait_healthy()
        yield etcd
    finally:
        etcd.close()


@pytest.fixture(scope="module")
def shared_agents_etcd(helm: Helm) -> Iterator[ChartEtcd]:
    etcd = ChartEtcd(helm, "etcd.nodeEnrollment.enabled=false")
    try:
        etcd.wait_healthy()
        yield etcd
    finally:
        etcd.close()


def bootstrap(etcd: ChartEtcd) -> subprocess.CompletedProcess[str]:
    """The operator pod's etcd-bootstrap init container, as rendered (paths mapped)."""
    deployment = find(etcd.docs, "Deployment", "-operator")
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "etcd-bootstrap"
    args = [a.replace("/etc/ciliary/etcd-root/ca.crt", str(etcd.dir / "ca.crt"))
            .replace("/etc/ciliary/etcd-root/tls.crt", str(etcd.dir / "root.crt"))
            .replace("/etc/ciliary/etcd-root/tls.key", str(etcd.dir / "root.key"))
            for a in init["args"] if not a.startswith("--etcd-endpoints")]
    argv = [sys.executable, *init["command"][1:], f"--etcd-endpoints={etcd.endpoint}", *args, "--wait", "20"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": PYTHONPATH})


def allowed(etcd: ChartEtcd, name: str, key: str, *, write: bool) -> bool:
    async def go() -> bool:
        client = make_client(EtcdEndpoint.parse(etcd.endpoint), etcd.tls(name), 5)
        try:
            if write:
                await client.put(key.encode(), b"x")
            else:
                await client.get(key.encode())
            return True
        except aetcd.ClientError as exc:
            if "permission denied" in str(exc):
                return False
            raise
        finally:
            await client.close()

    return asyncio.run(go())


def test_the_generated_server_certificate_names_the_service_and_loopback(chart_etcd: ChartEtcd) -> None:
    text = subprocess.run(["openssl", "x509", "-in", str(chart_etcd.dir / "server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for name in ("DNS:cy-ciliary-etcd.ciliary-system.svc", "DNS:cy-ciliary-etcd.ciliary-system.svc.cluster.local",
                 "IP Address:127.0.0.1"):
        assert name in text
    assert "--client-cert-auth" in chart_etcd.args and "--listen-client-urls=https://0.0.0.0:2379" in chart_etcd.args
    # the CA key is not in the Secret every etcd client references, only in the enroller's own Secret
    assert not (chart_etcd.dir / "ca.key").exists() and not (chart_etcd.dir / "agent.key").exists()
    ca_secret = find(chart_etcd.docs, "Secret", "-etcd-ca")["data"]
    assert sorted(ca_secret) == ["ca.crt", "ca.key"]
    assert base64.b64decode(ca_secret["ca.crt"]) == (chart_etcd.dir / "ca.crt").read_bytes()
    ca_cm = find(chart_etcd.docs, "ConfigMap", "-etcd-ca-cert")["data"]["ca.crt"]
    assert ca_cm.strip() == (chart_etcd.dir / "ca.crt").read_text().strip()


def test_bootstrap_enables_auth_and_is_idempotent(chart_etcd: ChartEtcd) -> None:
    for _ in range(2):
        done = bootstrap(chart_etcd)
        assert done.returncode == 0, done.stderr

    async def status() -> Any:
        from aetcd import rpc
        client = make_client(EtcdEndpoint.parse(chart_etcd.endpoint), chart_etcd.tls("root"), 5)
        try:
            await client.connect()
            return await rpc.AuthStub(client.channel).AuthStatus(rpc.AuthStatusRequest(), timeout=5)
        finally:
            await client.close()

    assert asyncio.run(status()).enabled


def enroll_node(etcd: ChartEtcd, node: str) -> None:
    """What the etcd-enroller does for an approved node: its etcd user and role, a certificate from the CA key."""
    import datetime

    from cryptography import x509

    from ciliary.operator.kube import node_certificates
    from ciliary.operator.store import accounts

    ca_secret = find(etcd.docs, "Secret", "-etcd-ca")["data"]
    authority = node_certificates.SigningAuthority.from_pem(base64.b64decode(ca_secret["ca.crt"]),
                                                            base64.b64decode(ca_secret["ca.key"]))
    key_pem, request_pem = node_certificates.new_key_and_request(access.node_user(node))
    cert = node_certificates.sign(authority, x509.load_pem_x509_csr(request_pem),
                                  validity=datetime.timedelta(days=1), now=datetime.datetime.now(datetime.UTC))
    (etcd.dir / f"{node}.crt").write_bytes(node_certificates.certificate_pem(cert))
    (etcd.dir / f"{node}.key").write_bytes(key_pem)

    async def user() -> None:
        client = make_client(EtcdEndpoint.parse(etcd.endpoint), etcd.tls("root"), 5)
        try:
            await accounts.apply_role(client, access.node_role(node))
        finally:
            await client.close()

    asyncio.run(user())


def test_chart_identities_after_bootstrap(chart_etcd: ChartEtcd) -> None:
    assert bootstrap(chart_etcd).returncode == 0
    intent, identity = keyspace.node_intent_key("n1"), keyspace.identity_id_key(4242)
    registration, report = keyspace.node_key("n2"), keyspace.report_key("u", "n2")
    assert allowed(chart_etcd, "operator", intent, write=True)
    assert allowed(chart_etcd, "operator", identity, write=True)
    assert not allowed(chart_etcd, "operator", registration, write=True)
    # no shared agent user by default; a node certificate signed with the chart's CA is that node's user only
    enroll_node(chart_etcd, "n2")
    assert allowed(chart_etcd, "n2", keyspace.node_intent_key("n2"), write=False)
    assert not allowed(chart_etcd, "n2", intent, write=False)
    assert not allowed(chart_etcd, "n2", keyspace.node_intent_key("n2"), write=True)
    assert allowed(chart_etcd, "n2", registration, write=True) and allowed(chart_etcd, "n2", report, write=True)
    assert not allowed(chart_etcd, "n2", keyspace.node_key("n1"), write=True)
    assert not allowed(chart_etcd, "n2", identity, write=True)
    # the relay's pair: the node records, read only; no intent, identity or registration write
    assert allowed(chart_etcd, "relay", registration, write=False)
    for key in (intent, identity, registration, keyspace.node_lb_intent_key("n1", "manifest")):
        assert not allowed(chart_etcd, "relay", key, write=True), key
    assert not allowed(chart_etcd, "relay", intent, write=False) and not allowed(chart_etcd, "relay", report, write=False)
    # the CLI's pair (ciliary-reader): what `ciliary policy trace/get`, `observe` and `service list` read, no write;
    # a Secret no pod references
    for key in (intent, identity, registration, report, keyspace.node_lb_intent_key("n1", "manifest")):
        assert allowed(chart_etcd, "reader", key, write=False), key
        assert not allowed(chart_etcd, "reader", key, write=True), key
    assert not allowed(chart_etcd, "reader", f"{access.OPERATOR_PREFIX}v1/leader", write=False)
    from cryptography import x509

    reader = find(chart_etcd.docs, "Secret", "-etcd-reader")
    pem = base64.b64decode(reader["data"]["tls.crt"])
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == f"CN={access.READER_USER}"
    pods = [d for d in chart_etcd.docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    assert pods and not any(reader["metadata"]["name"] in json.dumps(d) for d in pods)


def test_shared_agent_user_only_when_enrollment_is_off(shared_agents_etcd: ChartEtcd) -> None:
    chart_etcd = shared_agents_etcd
    assert bootstrap(chart_etcd).returncode == 0
    intent, identity = keyspace.node_intent_key("n1"), keyspace.identity_id_key(4242)
    registration, report = keyspace.node_key("n2"), keyspace.report_key("u", "n2")
    assert not [d for d in chart_etcd.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-etcd-ca")]
    # the weaker shared agent user: no intent or identity write, but every node's intent and agent keys
    assert access.shared_agents_role().user == "ciliary-agents"
    assert allowed(chart_etcd, "agent", intent, write=False)
    assert not allowed(chart_etcd, "agent", intent, write=True)
    assert not allowed(chart_etcd, "agent", identity, write=True)
    assert allowed(chart_etcd, "agent", registration, write=True) and allowed(chart_etcd, "agent", report, write=True)
    assert not allowed(chart_etcd, "agent", f"{access.OPERATOR_PREFIX}v1/leader", write=True)
