"""Helpers for running the real operator process against the integration control plane."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


class OperatorProcess:
    def __init__(self, kube, log: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.kube = kube
        self.log = log
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.operator.main", "--kubeconfig", str(self.kube.kubeconfig),
             *self.kube.etcd_flags(), "--log-level", "INFO", *self.extra_args],
            stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_size(self) -> int:
        """The log's current length: pass it to :meth:`wait_logged` to see only what comes after."""
        return len(self.text())

    def wait_logged(self, pattern: str, *, since: int, seconds: float = 60.0) -> re.Match[str]:
        """Wait until the log, after offset ``since``, has a line matching ``pattern`` (the operator's signals:
        ``reconcile pass <n> complete``, ``Status handover caught up``)."""
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.text()[since:]), seconds, f"operator log line /{pattern}/", self)


def wait_for(predicate: Callable[[], object], seconds: float, what: str, log: OperatorProcess | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.text()[-3000:] if log else ""
    pytest.fail(f"timed out after {seconds} s waiting for {what}\n{tail}")


def etcd_get_prefix(kube, prefix: str) -> dict[str, tuple[int, bytes]]:
    """key -> (mod_revision, value), read as etcd's root user (the test sees everything)."""
    import asyncio

    from ciliary.operator.store import access

    async def read() -> dict[str, tuple[int, bytes]]:
        store = kube.etcd_store(access.ROOT_USER)
        try:
            rows = await store.get_prefix(prefix.encode())
            return {bytes(kv.key).decode(): (int(kv.mod_revision), bytes(kv.value)) for kv in rows}
        finally:
            await store.close()

    return asyncio.run(read())
