"""The lab's etcd lockdown: its own CA, TLS-only listeners, client-certificate auth and roles.

etcd serves only ``https://127.0.0.1:<port>`` with ``--client-cert-auth``; authentication
is on, and each caller is the etcd user named by its certificate's CN:

  root                   the lab itself (creates users and roles; ``ciliary lab env`` for etcdctl)
  kube-apiserver         read/write under ``/registry/`` (and its compaction key) only
  ciliary-operator       the operator's role (``ciliary.operator.store.access.operator_role``)
  ciliary-relay          the Hubble relay: node registrations, read only (``access.relay_role``)
  ciliary-reader         the command line (``ciliary lab env``): reads, never writes (``access.reader_role``)
  ciliary-node-<node>    one per node agent (``access.node_role``)

Certificates live in ``pki/etcd/`` (a CA of their own). The roles come from the access
module, applied with ``store.accounts`` over a root connection, so the lab runs exactly
the rules a cluster would.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import pki, processes
from ciliary.operator.store import access, accounts
from ciliary.operator.store.access import Grant, Permission, Role
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, make_client

ETCD_SANS = "IP:127.0.0.1,DNS:localhost"
APISERVER_USER = "kube-apiserver"
APISERVER_ROLE = Role(name=APISERVER_USER, user=APISERVER_USER, grants=(
    Grant(Permission.READWRITE, "/registry/", prefix=True),
    Grant(Permission.READWRITE, "compact_rev_key"),
))
"""The lab's kube-apiserver keeps its objects under ``--etcd-prefix=/registry``; its compactor
coordinates through the unprefixed key ``compact_rev_key``."""


@dataclass(frozen=True)
class EtcdPKI:
    """Where the lab's etcd certificates are."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def server(self) -> tuple[Path, Path]:
        return self.directory / "server.crt", self.directory / "server.key"

    def client(self, user: str) -> EtcdTLS:
        """The client credentials of etcd user ``user`` (issued by :meth:`issue`)."""
        return EtcdTLS(self.ca_file, self.directory / f"{user}.crt", self.directory / f"{user}.key")

    def issue(self, user: str) -> EtcdTLS:
        """Issue (once) a client certificate whose CN is ``user``."""
        pki.ensure_cert(self.directory, user, f"/CN={user}")
        return self.client(user)

    def node(self, node: str) -> EtcdTLS:
        return self.issue(access.node_user(node))

    def ensure(self) -> None:
        """The CA, etcd's serving certificate and the fixed users' client certificates."""
        pki.ensure_ca(self.directory, name="ciliary-lab-etcd-ca", service_account=False)
        # clientAuth as well: etcd's own gateway dials its gRPC server with this certificate;
        # its CN names no etcd user, so that connection has no permission of its own
        pki.ensure_cert(self.directory, "server", "/CN=ciliary-lab-etcd", server=True, sans=ETCD_SANS,
                        client_too=True)
        for user in (access.ROOT_USER, APISERVER_USER, access.OPERATOR_USER, access.RELAY_USER, access.READER_USER):
            self.issue(user)


def etcd_pki(pki_dir: Path) -> EtcdPKI:
    return EtcdPKI(pki_dir / "etcd")


def server_flags(certs: EtcdPKI) -> list[str]:
    cert, key = certs.server()
    return ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", str(certs.ca_file),
            "--client-cert-auth"]


async def _bootstrap(endpoint: EtcdEndpoint, root: EtcdTLS, roles: Sequence[Role]) -> None:
    client = make_client(endpoint, root, 10.0)
    try:
        for role in roles:
            await accounts.apply_role(client, role)
        await accounts.enable_auth(client)
    finally:
        await client.close()


def bootstrap(endpoint: str, certs: EtcdPKI, nodes: Sequence[str] = ()) -> None:
    """Create the kube-apiserver, operator, relay, reader and node roles and turn authentication on (idempotent)."""
    roles = [APISERVER_ROLE, access.operator_role(), access.relay_role(), access.reader_role(),
             *(access.node_role(n) for n in nodes)]
    for node in nodes:
        certs.node(node)
    asyncio.run(_bootstrap(EtcdEndpoint.parse(endpoint), certs.client(access.ROOT_USER), roles))


def add_node(endpoint: str, certs: EtcdPKI, node: str) -> EtcdTLS:
    """Issue ``node``'s certificate and create its etcd user and role; returns its credentials."""
    bootstrap(endpoint, certs, [node])
    return certs.node(node)


def tls_context(tls: EtcdTLS) -> ssl.SSLContext:
    """An SSL context presenting ``tls``'s client certificate (for etcd's /health and /version)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file))
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


class StandaloneEtcd:
    """A one-member etcd locked down like the lab's, for tests that stop, restart or wipe it.

    Data and certificates live in ``workdir``; every :meth:`start` re-applies the users and
    roles (after :meth:`wipe` etcd has none) for the operator and every node :meth:`add_node` named.
    """

    def __init__(self, etcd: Path, workdir: Path) -> None:
        self.etcd = etcd
        self.workdir = workdir
        self.certs = EtcdPKI(workdir / "pki")
        self.certs.ensure()
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.nodes: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def flags(self, user: str) -> list[str]:
        tls = self.certs.client(user)
        return ["--etcd-ca-file", str(tls.ca_file), "--etcd-cert-file", str(tls.cert_file),
                "--etcd-key-file", str(tls.key_file)]

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.workdir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.etcd), "--name", "cyt", "--data-dir", str(self.workdir / "data"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 *server_flags(self.certs), "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"cyt={peer}", "--log-level", "warn",
                 "--listen-metrics-urls", "http://127.0.0.1:0"],
                stdout=log, stderr=subprocess.STDOUT)
        context = tls_context(self.certs.client(access.ROOT_USER))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=2, context=context) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"etcd in {self.workdir} did not become healthy")
            time.sleep(0.2)
        bootstrap(self.endpoint, self.certs, self.nodes)

    def add_node(self, node: str) -> list[str]:
        """Create ``node``'s etcd user and role; returns the agent's ``--etcd-*-file`` flags."""
        if node not in self.nodes:
            self.nodes.append(node)
        add_node(self.endpoint, self.certs, node)
        return self.flags(access.node_user(node))

    def stop(self) -> None:
        if self.proc is not None:
            processes.terminate(self.proc)

    def wipe(self) -> None:
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
