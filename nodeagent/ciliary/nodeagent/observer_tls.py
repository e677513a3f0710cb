"""Who may reach a Hubble Observer API, and how: mutual TLS off loopback, plaintext only where it is local.

Shared by the agent's Observer server (``observer_server``) and the relay that dials every agent
(``ciliary.operator.relay``). The decisions are pure (:func:`server_mode`, :func:`dial_mode`,
:func:`server_name`); :func:`server_credentials` and :func:`channel_credentials` read the files.

- An agent serves plaintext only on a loopback address or a unix socket (``ciliary observe``, a local
  ``hubble`` CLI). On any other address it serves TLS with its server certificate and requires a
  client certificate signed by the CA it is given (the relay's); without certificates it refuses to
  start unless ``--hubble-insecure`` was given, which logs :data:`INSECURE_WARNING` on every start.
- The relay dials a peer with its client certificate and checks the peer's server certificate
  against the CA it is given, for the name :func:`server_name` (Hubble's scheme: every agent holds
  one certificate for ``*.<cluster>.hubble-grpc.cilium.io``; the relay asks for
  ``<node>.<cluster>.hubble-grpc.cilium.io``). Without certificates it dials loopback peers only,
  unless ``--hubble-insecure``.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVER_NAME_SUFFIX = "hubble-grpc.cilium.io"
DEFAULT_CLUSTER = "default"
INSECURE_WARNING = ("Hubble Observer API without TLS on a non-loopback address (--hubble-insecure): anyone who "
                    "reaches it reads every flow of the node; for tests only")


class ObserverTLSError(ValueError):
    """An Observer API address that may not be served or dialled as configured (carries the address)."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class Mode(enum.Enum):
    TLS = "tls"
    PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class ServerTLS:
    """The agent's serving certificate and the CA that must have signed every client's certificate."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path


@dataclass(frozen=True)
class ClientTLS:
    """The relay's client certificate and the CA that must have signed every agent's server certificate."""

    cert_file: Path
    key_file: Path
    server_ca_file: Path
    cluster: str = DEFAULT_CLUSTER


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` or ``[V6]:PORT`` (``unix:...`` is returned whole)."""
    if address.startswith("unix:"):
        return address
    host, _sep, _port = address.rpartition(":")
    return host.strip("[]")


def is_local(address: str) -> bool:
    """A unix socket or a loopback address (``localhost`` included): reachable from this host only."""
    host = host_of(address)
    if host.startswith("unix:") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard (0.0.0.0 is not loopback either way)


def server_mode(address: str, tls: ServerTLS | None, *, insecure: bool) -> Mode:
    """How the agent serves ``address``: TLS when it has certificates; plaintext on a local address or when
    ``insecure`` was given; anything else is refused."""
    if tls is not None:
        return Mode.TLS
    if is_local(address) or insecure:
        return Mode.PLAINTEXT
    raise ObserverTLSError(address, "the Observer API on a non-loopback address needs --hubble-tls-cert-file, "
                                    "--hubble-tls-key-file and --hubble-tls-client-ca-file (mutual TLS), "
                                    "or --hubble-insecure (tests only)")


def dial_mode(address: str, tls: ClientTLS | None, *, insecure: bool) -> Mode:
    """How the relay dials a peer at ``address`` (see :func:`server_mode`)."""
    if tls is not None:
        return Mode.TLS
    if is_local(address) or insecure:
        return Mode.PLAINTEXT
    raise ObserverTLSError(address, "the relay dials a non-loopback agent only with mutual TLS "
                                    "(--hubble-tls-cert-file, --hubble-tls-key-file, --hubble-tls-server-ca-file) "
                                    "or --hubble-insecure")


def server_name(node: str, cluster: str = DEFAULT_CLUSTER) -> str:
    """The name the relay expects in ``node``'s certificate: ``<node>.<cluster>.hubble-grpc.cilium.io`` with the
    node name's dots made dashes (a wildcard covers one label)."""
    return f"{node.replace('.', '-')}.{cluster}.{SERVER_NAME_SUFFIX}"


def wildcard_name(cluster: str = DEFAULT_CLUSTER) -> str:
    """The name in the agents' shared server certificate."""
    return f"*.{cluster}.{SERVER_NAME_SUFFIX}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """TLS with ``tls``'s certificate; a client without a certificate signed by the client CA is refused."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "Hubble TLS key"), _read(tls.cert_file, "Hubble TLS certificate"))],
        root_certificates=_read(tls.client_ca_file, "Hubble client CA"), require_client_auth=True)


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.server_ca_file, "Hubble server CA"),
        private_key=_read(tls.key_file, "Hubble relay client key"),
        certificate_chain=_read(tls.cert_file, "Hubble relay client certificate"))


def files(cert: str, key: str, ca: str, *, what: str) -> tuple[Path, Path, Path] | None:
    """All three paths, or None when none is given; some but not all is an error naming the missing ones."""
    given = {"certificate": cert.strip(), "key": key.strip(), "CA": ca.strip()}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"{what}: the {', '.join(missing)} file is missing (give certificate, key and CA)")
    absent = [value for value in given.values() if not Path(value).is_file()]
    if absent:
        raise ValueError(f"{what}: no such file {absent[0]}")
    return Path(given["certificate"]), Path(given["key"]), Path(given["CA"])
