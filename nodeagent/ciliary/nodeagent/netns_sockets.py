"""Sockets opened inside the node's network namespace (listening ones, and its cookie).

The agent process may live outside the namespace whose veths it manages (the process lab
gives it ``--netns``; on a real node it runs with ``hostNetwork`` and ``netns`` is empty). A
port that clients of the node reach — a ``healthCheckNodePort``, kube-proxy's ``:10256`` —
must be bound in that namespace. :func:`listen_tcp` enters it in a short-lived thread
(``setns(2)`` changes only the calling thread), creates and binds the socket there and
returns it: a socket stays in the namespace it was created in, so the event loop can serve
it from any thread. :func:`netns_cookie` reads the namespace's cookie (``SO_NETNS_COOKIE``) the
same way: the bind guard of the socket load balancer compares it with each socket's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
NETNS_DIR = Path("/run/netns")


class NetnsSocketError(OSError):
    """The socket could not be created in the namespace (carries the namespace and the address)."""

    def __init__(self, netns: str, address: str, reason: str) -> None:
        super().__init__(f"listening socket {address} in netns {netns or '(own)'}: {reason}")
        self.netns, self.address = netns, address


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _cookie() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError:
        sock.close()
        raise
    return sock


def netns_cookie(netns: str | None) -> int:
    """The cookie of ``netns`` (None or "": the agent's own), as ``bpf_get_netns_cookie`` returns it."""
    sock = _in_netns(netns, "cookie", _cookie)
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    finally:
        sock.close()


def listen_tcp(netns: str | None, host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` in ``netns`` (None or "": the agent's own)."""
    return _in_netns(netns, f"{host}:{port}", lambda: _bind(host, port))


def _in_netns(netns: str | None, address: str, make: Callable[[], socket.socket]) -> socket.socket:
    if not netns:
        try:
            return make()
        except OSError as exc:
            raise NetnsSocketError("", address, exc.strerror or str(exc)) from exc
    result: list[socket.socket | OSError] = []

    def enter_and_make() -> None:
        try:
            with open(NETNS_DIR / netns, "rb") as ns:
                _setns(ns.fileno())
            result.append(make())
        except OSError as exc:  # reported to the caller below
            result.append(exc)

    # The thread ends right after: its namespace dies with it, the socket keeps its own.
    worker = threading.Thread(target=enter_and_make, name=f"netns-{address}")
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive() or not result:
        raise NetnsSocketError(netns, address, os.strerror(errno.ETIMEDOUT))
    outcome = result[0]
    if isinstance(outcome, OSError):
        reason = outcome.strerror or str(outcome)
        raise NetnsSocketError(netns, address, reason) from outcome
    return outcome
