"""Helpers for running the real operator process against the integration control plane."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


class OperatorProcess:
    def __init__(self, kube, log: Path) -> None:
        self.kube = kube
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.operator.main", "--kubeconfig", str(self.kube.kubeconfig),
             "--etcd-endpoints", self.kube.etcd_endpoint, "--log-level", "INFO"],
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
    """key -> (mod_revision, value) through etcd's JSON gateway (no client library needed)."""
    import base64
    import urllib.request

    def b64(s: bytes) -> str:
        return base64.b64encode(s).decode()

    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps({"key": b64(prefix.encode()), "range_end": b64(end.encode())}).encode()
    req = urllib.request.Request(f"{kube.etcd_endpoint}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        data = json.load(resp)
    return {base64.b64decode(kv["key"]).decode(): (int(kv["mod_revision"]), base64.b64decode(kv.get("value", "")))
            for kv in data.get("kvs", [])}
