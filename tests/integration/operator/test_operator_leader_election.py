"""Two operator replicas with --leader-election: one leads, the other takes over when it goes away."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from op_harness import OperatorProcess, etcd_get_prefix, wait_for

pytestmark = pytest.mark.integration
KEY = "/ciliary/operator/v1/leader-test"


class Replica(OperatorProcess):
    def __init__(self, kube, log, name: str) -> None:
        super().__init__(kube, log)
        self.name = name

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.operator.main", "--kubeconfig", str(self.kube.kubeconfig),
             *self.kube.etcd_flags(), "--leader-election", "--leader-key", KEY,
             "--leader-id", self.name, "--leader-lease-ttl", "4"], stdout=out, stderr=subprocess.STDOUT)


def holder(kube) -> str | None:
    import json

    rows = etcd_get_prefix(kube, KEY)
    return json.loads(rows[KEY][1])["holder"] if KEY in rows else None


def test_one_leader_and_failover(kube, crds, tmp_path):
    a = Replica(kube, tmp_path / "a.log", "replica-a")
    b = Replica(kube, tmp_path / "b.log", "replica-b")
    a.start()
    try:
        wait_for(lambda: holder(kube) == "replica-a", 30, "replica-a to lead", a)
        b.start()
        wait_for(lambda: "waiting for leadership; held by replica-a" in b.text(), 30, "replica-b to wait", b)
        assert "reconciled" not in b.text() and "published" not in b.text()
        assert b.proc is not None and b.proc.poll() is None
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # a silent leader: its lease must expire
        a.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: holder(kube) == "replica-b", 30, "replica-b to take over", b)
        assert time.monotonic() - t0 < 4 + 20
        wait_for(lambda: "became leader" in b.text(), 10, "replica-b to say so", b)
        b.stop()
        assert b.proc is None
        wait_for(lambda: holder(kube) is None, 10, "a stopped leader to release the key", b)
    finally:
        a.stop()
        b.stop()
