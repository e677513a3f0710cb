"""Running a bench's ``--smoke`` mode from a test: the bench as a subprocess, bounded, its clean-up kept.

Shared by ``tests/integration/bench/test_bench_smoke.py`` and ``e2e/test_lab_kube_proxy.py`` (whose peer lab
the kube-proxy bench attaches to). A bench that overruns is sent SIGTERM, which ends it through its clean-up,
and then killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from realnode_lab import ChartLab

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "nodeagent", "e2e"))}


def run(*argv: str, lab: ChartLab | None = None, prefix: str | None = None, timeout: float = 300) -> str:
    """The bench's ``--smoke``; with ``lab``, on the session's real-node lab (``--lab``, its prefix)."""
    env, extra = ENV, []
    if lab is not None:
        prefix = lab.lab.layout.prefix
        extra = ["--lab", str(lab.lab.layout.state_dir)]
    if prefix is not None:
        env = {**ENV, "CILIARY_LAB_PREFIX": prefix}
    else:  # labs given by ``--lab`` in argv are found under the prefix their lab.json records
        env = {k: v for k, v in ENV.items() if k != "CILIARY_LAB_PREFIX"}
    proc = subprocess.Popen([sys.executable, *argv, "--smoke", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench's finally blocks remove its pods, namespace and own lab
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"{argv} overran {timeout:.0f} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    if lab is not None:
        assert f"lab: attached to {lab.lab.layout.state_dir}" in stdout, stdout[-3000:]
    return stdout


def netns() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                       check=True).stdout.splitlines() if line.strip()}
