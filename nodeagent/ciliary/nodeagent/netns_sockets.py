"""Sockets created inside the node's network namespace, for an agent that runs outside it.

Owns :class:`NetnsSockets`: one worker thread that enters the namespace once
(``setns`` changes only the calling thread) and creates sockets there on request.
A socket belongs to the namespace it was created in for its whole life, so the
caller then uses it from the event loop like any other. ``netns=None``: the
agent already runs in the node's namespace (a hostNetwork pod), sockets are made
directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import socket
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
