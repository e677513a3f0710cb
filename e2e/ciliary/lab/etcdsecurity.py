"""The lab's etcd lockdown: its own CA, TLS-only listeners, client-certificate auth and roles.

etcd serves only ``https://127.0.0.1:<port>`` with ``--client-cert-auth``; authentication
is on, and each caller is the etcd user named by its certificate's CN:

  root                   the lab itself (creates users and roles; ``ciliary lab env`` for etcdctl)
  kube-apiserver         read/write under ``/registry/`` only
  ciliary-operator       the operator's role (``ciliary.operator.store.access.operator_role``)
  ciliary-node-<node>    one per node agent (``access.node_role``)

Certificates live in ``pki/etcd/`` (a CA of their own). The roles come from the access
module, applied with ``store.accounts`` over a root connection, so the lab runs exactly
the rules a cluster would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import pki
from ciliary.operator.store import access, accounts
from ciliary.operator.store.access import Grant, Permission, Role
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, make_client

ETCD_SANS = "IP:127.0.0.1,DNS:localhost"
APISERVER_USER = "kube-apiserver"
APISERVER_ROLE = Role(name=APISERVER_USER, user=APISERVER_USER,
                      grants=(Grant(Permission.READWRITE, "/registry/", prefix=True),))
"""The lab's kube-apiserver keeps its objects under ``--etcd-prefix=/registry``."""


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
        for user in (access.ROOT_USER, APISERVER_USER, access.OPERATOR_USER):
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
    """Create the kube-apiserver, operator and node roles and turn authentication on (idempotent)."""
    roles = [APISERVER_ROLE, access.operator_role(), *(access.node_role(n) for n in nodes)]
    for node in nodes:
        certs.node(node)
    asyncio.run(_bootstrap(EtcdEndpoint.parse(endpoint), certs.client(access.ROOT_USER), roles))


def add_node(endpoint: str, certs: EtcdPKI, node: str) -> EtcdTLS:
    """Issue ``node``'s certificate and create its etcd user and role; returns its credentials."""
    bootstrap(endpoint, certs, [node])
    return certs.node(node)
