"""Sockets created inside the node's network namespace, for an agent that runs outside it.

The agent may live outside the namespace whose veths it manages (an agent the lab starts as a process,
without the chart, is given its node's namespace; on a real node it runs with ``hostNetwork`` and
``netns`` is None). ``setns(2)``
changes only the calling thread, and a socket belongs to the namespace it was created in for
its whole life, so the caller then uses it from the event loop like any other. Two ways in:

- :class:`NetnsSockets`: one worker thread that enters the namespace once and creates sockets
  there on request (the DNS proxy's many sockets);
- :func:`listen_tcp` and :func:`netns_cookie`: a short-lived thread per call, for the
  load balancer's few listeners (health-check node ports, kube-proxy's ``:10256``) and a
  namespace's cookie (``SO_NETNS_COOKIE``): the node's, which the NodePort bind guard compares with
  each socket's, and a pod's the CNI plugin did not report (``EndpointRegistry.learn_cookies``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


class NetnsError(OSError):
    """The namespace could not be entered."""


def netns_path(netns: str) -> Path:
    """``/run/netns/<name>`` for a name (iproute2's), the path itself for an absolute path."""
    return Path(netns) if netns.startswith("/") else NETNS_DIR / netns


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsError(errno, f"setns({netns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetnsSockets:
    """Makes sockets in one namespace (thread-safe; the worker thread stays in the namespace)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if netns:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="netns", initializer=_enter, initargs=(netns,))

    async def make(self, family: int, kind: int, setup: Callable[[socket.socket], None]) -> socket.socket:
        """A non-blocking socket of (family, kind), after ``setup`` (options, bind) ran in the namespace."""
        def create() -> socket.socket:
            sock = socket.socket(family, kind)
            try:
                setup(sock)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        if self._executor is None:
            return create()
        return await asyncio.get_running_loop().run_in_executor(self._executor, create)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


# -- one-off sockets (a short-lived thread per call) ----------------------------------------

SO_NETNS_COOKIE = 71


class NetnsSocketError(OSError):
    """The socket could not be created in the namespace (carries the namespace and the address)."""

    def __init__(self, netns: str, address: str, reason: str) -> None:
        what = "cookie" if address == "cookie" else f"listening socket {address}"
        super().__init__(f"{what} in netns {netns or '(own)'}: {reason}")
        self.netns, self.address = netns, address


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
            _enter(netns)
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
