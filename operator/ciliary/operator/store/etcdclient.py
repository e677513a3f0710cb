"""The one way Ciliary's processes talk to etcd: endpoint parsing, connection, bounded retries.

Wraps aetcd (asyncio, protobuf-7 compatible). Connections use mutual TLS
(``https://`` endpoints, a CA, a client certificate and key: :class:`EtcdTLS`); etcd
takes the caller's user from the certificate's CN (``store.access`` names them). Plain
``http://`` is refused unless the caller explicitly asked for it (``--etcd-insecure``):
:func:`connection_settings` is the one check every component runs at start-up. etcd restarts make the first RPC
fail once with ConnectionFailedError while the channel reconnects, so every call
goes through :meth:`EtcdStore.call` with a short, bounded retry.

Fencing: an operator replica that won the leader election sets
:attr:`EtcdStore.fence`; from then on every :meth:`EtcdStore.transaction` (and
:meth:`EtcdStore.delete_fenced`) also compares the election key's create
revision, so a leader that was paused past its lease, and lost the key, cannot
write even once more: it gets :class:`FenceLostError` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.watcher
import grpc
from aetcd import rpc

log = logging.getLogger(__name__)
T = TypeVar("T")
GRPC_OPTIONS = {
    # gRPC's default 4 MiB receive limit is far below a 1,000-node cluster's reports or intents
    # listed at once (tens of MB); etcd itself limits a request to its --max-request-bytes
    "grpc.max_receive_message_length": 512 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
}
"""Channel options every Ciliary etcd client uses."""

RETRYABLE: tuple[type[BaseException], ...] = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)


class EtcdUnavailableError(RuntimeError):
    """etcd did not answer after the bounded retries; carries the endpoint."""

    def __init__(self, endpoint: str, cause: BaseException) -> None:
        super().__init__(f"etcd at {endpoint} unavailable: {cause}")
        self.endpoint = endpoint


@dataclass(frozen=True)
class Fence:
    """Writes are valid only while ``key`` is the one created at ``create_revision`` (this replica leads)."""

    key: bytes
    create_revision: int


class FenceLostError(RuntimeError):
    """A fenced write was refused: the election key is gone or someone else's; carries the fence."""

    def __init__(self, fence: Fence) -> None:
        super().__init__(f"etcd write refused: {fence.key.decode()} is no longer the key this replica created "
                         f"(revision {fence.create_revision}); another replica may lead")
        self.fence = fence


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int
    secure: bool = True
    """https (mutual TLS); False only for an explicit ``http://`` endpoint."""

    @classmethod
    def parse(cls, text: str) -> EtcdEndpoint:
        """``https://127.0.0.1:2379``, ``http://…`` (plain), ``127.0.0.1:2379`` or ``host`` (https, port 2379)."""
        text = text.strip()
        parts = urlsplit(text if "://" in text else f"https://{text}")
        if parts.scheme not in ("https", "http"):
            raise ValueError(f"etcd endpoint {text!r}: the scheme must be https (or http with --etcd-insecure)")
        if not parts.hostname:
            raise ValueError(f"etcd endpoint {text!r} has no host")
        return cls(parts.hostname, parts.port or 2379, parts.scheme == "https")

    def __str__(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class EtcdTLS:
    """Mutual TLS to etcd: the CA that signed etcd's serving certificate, and this client's certificate."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes(),
                                            private_key=self.key_file.read_bytes(),
                                            certificate_chain=self.cert_file.read_bytes())


class EtcdConfigError(ValueError):
    """How to reach etcd was configured unsafely or incompletely; carries the offending endpoints."""

    def __init__(self, message: str, endpoints: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.endpoints = tuple(endpoints)


INSECURE_WARNING = ("etcd is reached over plain HTTP (--etcd-insecure): anyone on the network path can read "
                    "and rewrite intents; use https endpoints with --etcd-ca-file/--etcd-cert-file/--etcd-key-file")


def connection_settings(endpoints: str, *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                        insecure: bool = False) -> tuple[tuple[EtcdEndpoint, ...], EtcdTLS | None]:
    """Parse comma-separated endpoints and the TLS files; refuse what is not safe unless ``insecure``.

    https endpoints need all three files. An ``http://`` endpoint is refused unless ``insecure``.
    Raises :class:`EtcdConfigError` (a ValueError) with a message saying what to pass.
    """
    parsed = tuple(EtcdEndpoint.parse(item) for item in (p.strip() for p in endpoints.split(",")) if item)
    if not parsed:
        raise EtcdConfigError("at least one etcd endpoint is needed")
    plain = [str(e) for e in parsed if not e.secure]
    if plain and not insecure:
        raise EtcdConfigError(f"plain-HTTP etcd endpoint(s) {', '.join(plain)} refused: use https:// with "
                              "--etcd-ca-file, --etcd-cert-file and --etcd-key-file, or pass --etcd-insecure "
                              "to accept an unauthenticated, unencrypted connection", plain)
    files = {"--etcd-ca-file": ca_file, "--etcd-cert-file": cert_file, "--etcd-key-file": key_file}
    if not any(e.secure for e in parsed):
        return parsed, None
    missing = [flag for flag, value in files.items() if not value]
    if missing:
        raise EtcdConfigError(f"https etcd endpoints need {', '.join(missing)} (mutual TLS: the CA of etcd's "
                              "certificate and this component's client certificate and key)",
                              [str(e) for e in parsed])
    unreadable = [f"{flag} {value}" for flag, value in files.items() if not Path(value).is_file()]
    if unreadable:
        raise EtcdConfigError(f"etcd TLS file(s) not found: {', '.join(unreadable)}", [str(e) for e in parsed])
    return parsed, EtcdTLS(Path(ca_file), Path(cert_file), Path(key_file))


class TLSClient(aetcd.Client):
    """aetcd's client over a mutual-TLS channel (aetcd itself only opens insecure channels)."""

    def __init__(self, *, host: str, port: int, tls: EtcdTLS, timeout: float | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(host=host, port=port, timeout=timeout, options=options)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._tls.credentials(),
                                                   options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self.auth_stub = rpc.AuthStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def make_client(endpoint: EtcdEndpoint, tls: EtcdTLS | None, timeout: float) -> aetcd.Client:
    """A client for ``endpoint``: mutual TLS when it is https (``tls`` required), plain only for http."""
    if endpoint.secure:
        if tls is None:
            raise EtcdConfigError(f"etcd endpoint {endpoint} is https but no client certificate was given",
                                  [str(endpoint)])
        return TLSClient(host=endpoint.host, port=endpoint.port, tls=tls, timeout=timeout,
                         options=dict(GRPC_OPTIONS))
    return aetcd.Client(host=endpoint.host, port=endpoint.port, timeout=timeout, options=dict(GRPC_OPTIONS))


class EtcdStore:
    """An aetcd client with bounded retries, created lazily and shared by one process."""

    def __init__(self, endpoint: EtcdEndpoint, *, tls: EtcdTLS | None = None, timeout: float = 5.0,
                 attempts: int = 5, fallbacks: Sequence[EtcdEndpoint] = ()) -> None:
        self.endpoint = endpoint
        self.tls = tls
        self.endpoints = (endpoint, *fallbacks)
        """Tried in turn: a connection failure moves the store to the next one."""
        self.timeout = timeout
        self.attempts = attempts
        self._client: aetcd.Client | None = None
        self.fence: Fence | None = None
        """Set by the leader election: every transaction is then fenced (see the module docstring)."""

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            self._client = make_client(self.endpoint, self.tls, self.timeout)
        return self._client

    async def call(self, make: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        delay = 0.2
        for attempt in range(1, self.attempts + 1):
            try:
                return await make(self.client)
            except RETRYABLE as exc:
                if attempt == self.attempts:
                    raise EtcdUnavailableError(str(self.endpoint), exc) from exc
                log.warning("etcd call to %s failed (attempt %d/%d): %s", self.endpoint, attempt, self.attempts, exc)
                if len(self.endpoints) > 1:
                    await self._next_endpoint()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def get(self, key: bytes) -> aetcd.rtypes.Get | None:
        return await self.call(lambda c: c.get(key))

    async def get_prefix(self, prefix: bytes) -> aetcd.rtypes.GetRange:
        return await self.call(lambda c: c.get_prefix(prefix))

    async def put(self, key: bytes, value: bytes, lease: aetcd.Lease | None = None) -> aetcd.rtypes.Put:
        return await self.call(lambda c: c.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> aetcd.rtypes.Delete | None:
        return await self.call(lambda c: c.delete(key))

    @property
    def ops(self) -> aetcd.Transactions:
        """Builders for transaction comparisons and operations (``ops.version(key) == 0``)."""
        return self.client.transactions

    async def transaction(self, compare: list[Any], success: list[Any],
                          failure: list[Any] | None = None, *, fenced: bool = True) -> tuple[bool, list[Any]]:
        """Run a transaction; with a :attr:`fence` set (and ``fenced``), only while this replica leads.

        Raises :class:`FenceLostError` when the comparison failed because of the fence.
        """
        fence = self.fence if fenced else None
        guard = [self.ops.create(fence.key) == fence.create_revision] if fence is not None else []

        async def run(c: aetcd.Client) -> tuple[bool, list[Any]]:
            ok, responses = await c.transaction(compare=[*compare, *guard], success=success, failure=failure or [])
            return bool(ok), list(responses or [])

        ok, responses = await self.call(run)
        if not ok and fence is not None:
            held = await self.get(fence.key)
            if held is None or held.create_revision != fence.create_revision:
                raise FenceLostError(fence)
        return ok, responses

    async def delete_fenced(self, key: bytes) -> None:
        """Delete ``key`` (fenced like :meth:`transaction` when a fence is set)."""
        await self.transaction([], [self.ops.delete(key)])

    async def _next_endpoint(self) -> None:
        """Drop the connection and use the next endpoint (watches created from ``client`` must be re-created)."""
        at = self.endpoints.index(self.endpoint)
        self.endpoint = self.endpoints[(at + 1) % len(self.endpoints)]
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
