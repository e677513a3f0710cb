"""The agent's Observer API off loopback is mutual TLS, and the relay reaches it with its own identities.

Real processes: ``ciliary-agent`` (``--datapath off``: only its etcd registration and its Observer API
matter here) listening on the root end of a veth pair this test creates (a non-loopback address), with
a server certificate for ``*.default.hubble-grpc.cilium.io`` and the relay CA as its client CA; and
``ciliary-relay`` reading the node records from the session's etcd as the ``ciliary-relay`` etcd user.

Checked: a client without a certificate, a plaintext client, and a client whose certificate another
CA signed are all refused by the agent; the relay's certificate works, directly and through the
relay (which verifies the agent's certificate for ``<node>.default.hubble-grpc.cilium.io``); a relay
given no certificates does not dial the agent in plaintext; the unix socket serves plaintext locally;
an agent told to listen off loopback without certificates refuses to start, and with
``--hubble-insecure`` warns.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ciliary.hubbleapi import observer_pb2, observer_pb2_grpc, relay_pb2
from ciliary.lab import pki, processes
from ciliary.nodeagent import observer_tls
from ciliary.operator.store import access

pytestmark = pytest.mark.integration

TAG = secrets.token_hex(3)
NODE = f"cyt-obs-{TAG}"
NETNS = f"cyt-obs-{TAG}"
HOST_IF, PEER_IF = f"cyo{TAG}h", f"cyo{TAG}p"
ADDRESS = f"10.251.{int(TAG[:2], 16)}.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """A non-loopback address of this host: the root end of a veth pair whose other end is in a new netns."""
    try:
        ip("netns", "add", NETNS)
        ip("link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", NETNS)
        ip("addr", "add", f"{ADDRESS}/30", "dev", HOST_IF)
        ip("link", "set", HOST_IF, "up")
        yield ADDRESS
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", HOST_IF)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "del", NETNS)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Hubble CA (server and relay client certificates) and a stranger CA with a client certificate."""
    hubble, other = tmp_path_factory.mktemp("hubble-ca"), tmp_path_factory.mktemp("other-ca")
    wildcard = observer_tls.wildcard_name()
    pki.ensure_ca(hubble, name="cyt-hubble-ca", service_account=False)
    pki.ensure_cert(hubble, "server", f"/CN={wildcard}", server=True, sans=f"DNS:{wildcard}")
    pki.ensure_cert(hubble, "relay", "/CN=hubble-relay-client")
    pki.ensure_ca(other, name="cyt-other-ca", service_account=False)
    pki.ensure_cert(other, "relay", "/CN=hubble-relay-client")
    return {"ca": hubble / "ca.crt", "server.crt": hubble / "server.crt", "server.key": hubble / "server.key",
            "relay.crt": hubble / "relay.crt", "relay.key": hubble / "relay.key",
            "other.crt": other / "relay.crt", "other.key": other / "relay.key", "other-ca": other / "ca.crt"}


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


def agent_argv(kube: Any, tmp_path: Path, *extra: str, node: str = NODE) -> list[str]:
    etcd = kube.etcd_node_tls(node)
    return [sys.executable, "-m", "ciliary.nodeagent.main", "--node", node, "--datapath", "off",
            "--socket", str(tmp_path / "agent.sock"), "--state-dir", str(tmp_path / "state"),
            "--health-addr", "127.0.0.1:0", "--etcd-endpoints", kube.etcd_endpoint,
            "--etcd-ca-file", str(etcd.ca_file), "--etcd-cert-file", str(etcd.cert_file),
            "--etcd-key-file", str(etcd.key_file), "--lease-ttl", "4", *extra]


@pytest.fixture(scope="module")
def agent(kube: Any, address: str, certs: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The agent: its Observer API address (``target``) and its local socket (``socket``)."""
    tmp = tmp_path_factory.mktemp("agent")
    target = f"{address}:{_free_port()}"
    argv = agent_argv(kube, tmp, "--hubble-addr", target, "--hubble-socket", str(tmp / "hubble.sock"),
                      "--hubble-tls-cert-file", str(certs["server.crt"]),
                      "--hubble-tls-key-file", str(certs["server.key"]),
                      "--hubble-tls-client-ca-file", str(certs["ca"]))
    log = tmp / "agent.log"
    proc = spawn(argv, log)
    try:
        out = wait_log(proc, log, "Hubble Observer API serving")
        assert "mode=tls" in out, out
        yield {"target": target, "socket": str(tmp / "hubble.sock")}
    finally:
        processes.terminate(proc)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(target: str, credentials: grpc.ChannelCredentials | None, *, name: str = "") -> Any:
    """ServerStatus over a channel (TLS with ``credentials``, else plaintext): the answer, or the grpc error."""
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
               else grpc.insecure_channel(target))
    with channel:
        try:
            return observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc


def client_credentials(certs: dict[str, Path], who: str | None) -> grpc.ChannelCredentials:
    ca = certs["ca"].read_bytes()
    if who is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=certs[f"{who}.key"].read_bytes(),
                                        certificate_chain=certs[f"{who}.crt"].read_bytes())


def test_only_a_client_with_the_relay_certificate_reads_the_agent(agent: dict[str, str],
                                                                   certs: dict[str, Path]) -> None:
    target, name = agent["target"], observer_tls.server_name(NODE)
    plaintext = status(target, None)
    assert isinstance(plaintext, grpc.RpcError) and plaintext.code() == grpc.StatusCode.UNAVAILABLE
    no_cert = status(target, client_credentials(certs, None), name=name)
    assert isinstance(no_cert, grpc.RpcError) and no_cert.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = status(target, client_credentials(certs, "other"), name=name)
    assert isinstance(other_ca, grpc.RpcError) and other_ca.code() == grpc.StatusCode.UNAVAILABLE
    relay = status(target, client_credentials(certs, "relay"), name=name)
    assert isinstance(relay, observer_pb2.ServerStatusResponse), relay
    assert relay.version.startswith("ciliary-")
    wrong_name = status(target, client_credentials(certs, "relay"), name="node.other.hubble-grpc.cilium.io")
    assert isinstance(wrong_name, grpc.RpcError), "the agent's certificate names only *.default.hubble-grpc.cilium.io"


def test_the_local_socket_serves_plaintext(agent: dict[str, str]) -> None:
    answer = status(f"unix:{agent['socket']}", None)
    assert isinstance(answer, observer_pb2.ServerStatusResponse), answer


def relay_nodes(kube: Any, tmp_path: Path, *extra: str) -> Any:
    """GetNodes through a ``ciliary-relay`` process that reads the peers from etcd as ``ciliary-relay``."""
    port = _free_port()
    etcd = kube.etcd_tls(access.RELAY_USER)
    argv = [sys.executable, "-m", "ciliary.operator.relay", "--listen", f"127.0.0.1:{port}",
            "--etcd-endpoints", kube.etcd_endpoint, "--etcd-ca-file", str(etcd.ca_file),
            "--etcd-cert-file", str(etcd.cert_file), "--etcd-key-file", str(etcd.key_file), "--refresh", "0.5",
            *extra]
    log = tmp_path / f"relay-{time.monotonic_ns()}.log"
    proc = spawn(argv, log)
    try:
        wait_log(proc, log, "Relay peers")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            deadline = time.monotonic() + 20
            while True:
                nodes = {n.name: n for n in stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes}
                mine = nodes.get(NODE)
                if (mine is not None and mine.state == relay_pb2.NODE_CONNECTED) or time.monotonic() > deadline:
                    return mine, log.read_text(errors="replace")
                time.sleep(0.5)
    finally:
        processes.terminate(proc)


def test_the_relay_dials_the_agent_with_its_certificate_and_etcd_identity(
        kube: Any, agent: dict[str, str], certs: dict[str, Path], tmp_path: Path) -> None:
    node, out = relay_nodes(kube, tmp_path, "--hubble-tls-cert-file", str(certs["relay.crt"]),
                            "--hubble-tls-key-file", str(certs["relay.key"]),
                            "--hubble-tls-server-ca-file", str(certs["ca"]))
    assert node is not None and node.state == relay_pb2.NODE_CONNECTED, out
    assert node.tls.enabled and node.address == agent["target"]


def test_a_relay_without_certificates_does_not_dial_the_agent_in_plaintext(
        kube: Any, agent: dict[str, str], tmp_path: Path) -> None:
    node, out = relay_nodes(kube, tmp_path)
    assert node is not None and node.state == relay_pb2.NODE_UNAVAILABLE, out


def test_a_relay_trusting_another_ca_finds_the_agent_unavailable(
        kube: Any, agent: dict[str, str], certs: dict[str, Path], tmp_path: Path) -> None:
    node, out = relay_nodes(kube, tmp_path, "--hubble-tls-cert-file", str(certs["relay.crt"]),
                            "--hubble-tls-key-file", str(certs["relay.key"]),
                            "--hubble-tls-server-ca-file", str(certs["other-ca"]))
    assert node is not None and node.state == relay_pb2.NODE_UNAVAILABLE, out


def test_an_agent_refuses_a_plaintext_non_loopback_observer_api_unless_told_and_then_warns(
        kube: Any, address: str, tmp_path: Path) -> None:
    target = f"{address}:{_free_port()}"
    other = f"{NODE}-plain"
    refused = subprocess.run(agent_argv(kube, tmp_path, "--hubble-addr", target, node=other), capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "--hubble-insecure" in refused.stderr, refused.stderr
    log = tmp_path / "insecure.log"
    proc = spawn(agent_argv(kube, tmp_path, "--hubble-addr", target, "--hubble-insecure", node=other), log)
    try:
        out = wait_log(proc, log, "Hubble Observer API serving")
        assert "WARNING" in out and "--hubble-insecure" in out, out
        answer = status(target, None)
        assert isinstance(answer, observer_pb2.ServerStatusResponse), answer
    finally:
        processes.terminate(proc)
