"""The benchmarks still run: each bench's ``--smoke`` mode (tiny sizes) must finish and print its table.

Figures are not asserted (the machine is shared); what is checked is that every
bench completes, prints the rows it promises (with numbers), and leaves no
network namespace, lab directory or bpffs pin of its own behind. A bench that needs a cluster runs on
the session's real-node lab (``chart_lab``, tests/realnode_lab.py; the bench's ``--lab``, and it says
``lab: attached to DIR``), so only the kube-proxy bench brings up a lab of its own: its peer's, with
kube-proxy (and Ciliary's too when the session's lab has kube-proxy). A bench that overruns is sent
SIGTERM, which ends it through its clean-up, and then killed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from realnode_lab import KUBE_PROXY_REPLACEMENT, ChartLab, ensure_installed, lab_mode

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "nodeagent", "e2e"))}


def run(*argv: str, lab: ChartLab | None = None, prefix: str | None = None, timeout: float = 300) -> str:
    """The bench's ``--smoke``; with ``lab``, on the session's real-node lab (``--lab``, its prefix)."""
    env, extra = ENV, []
    if lab is not None:
        prefix = lab.lab.layout.prefix
        extra = ["--lab", str(lab.lab.layout.state_dir)]
    if prefix is not None:
        env = {**ENV, "CILIARY_LAB_PREFIX": prefix}
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


def test_datapath_bench_smoke() -> None:
    before = netns()
    out = run("bench/bench_datapath.py")
    for mode in ("crr", "rr"):
        assert re.search(rf"^\s*{mode}\s+10\s+\d+/s\s+\d+/s\s+\d+/s\s+[0-9.]+\s+[0-9.]+$", out, re.M), out
    assert re.search(r"loopback \(generator ceiling, no veth\): CRR \d+/s, RR \d+/s", out), out
    assert "clang runs during policy changes: 0" in out
    assert not {n for n in netns() - before if n.startswith("cyt-dp-")}, "the bench left network namespaces"


def test_l7_http_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_l7_http.py", lab=chart_lab)
    rows = re.findall(r"^(near|far)\s+(keepalive|new|ka-x2)\s+\d+\s+\d+\s+[0-9.]+\s.*\s[0-9.]+$", out, re.M)
    assert sorted(rows) == [(pod, mode) for pod in ("far", "near") for mode in ("ka-x2", "keepalive", "new")], out
    accounting = re.findall(r"^(near|far)\s+(keepalive|new|ka-x2)\s+(l4|l7)\s+(?:\d+/\d+\s+){4}[0-9.]+$", out, re.M)
    assert len(accounting) == 12, out
    assert not list(ROOT.glob(".lab-benchl7-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "bench-l7").returncode != 0, "the bench left its namespace"


def test_policy_change_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_policy_change.py", lab=chart_lab)
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+) \|", out, re.M)
    assert [(size, changes) for size, changes, *_ in rows] == [("1", "4"), ("100", "4")], out
    assert "of 4 found in the log" in out, out  # the operator's stage was attributed
    assert re.search(r"target p99 < 250 ms for 1 entry: (met|NOT met)", out), out
    assert not list(ROOT.glob(".lab-benchpc-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "bench-pc").returncode != 0, "the bench left its namespace"


def test_status_bench_smoke() -> None:
    out = run("-m", "bench.bench_status")
    row = re.search(r"^\s*10\s+handover\s+(\d+)\s+.*\s([0-9.]+)\s+(\d+)$", out, re.M)
    assert row, out
    assert float(row[2]) > 0 and int(row[3]) > 0, "intents without size or entries: not resolved"
    assert "did not finish" not in out
    assert not list(ROOT.glob(".lab-benchstatus-*")), "the bench left its control plane directory"


def test_netpol_resolution_bench_smoke() -> None:
    out = run("-m", "bench.bench_netpol_resolution")
    assert re.search(r"^scale: 20 NetworkPolicies, 200 pods, 4 nodes \(200 endpoints, [1-9]\d* with ingress enforced, "
                     r"[1-9]\d* policy entries\)$", out, re.M), out
    for row in ("full resolution:", "incremental, one NetworkPolicy edit", "peak RSS:"):
        assert re.search(rf"^{row}.*\d+\.\d", out, re.M), out


def test_kube_proxy_bench_smoke(chart_lab: ChartLab) -> None:
    """Ciliary's side on the session's lab when it runs without kube-proxy; the peer's lab is the bench's own."""
    ensure_installed(chart_lab)
    attach = ["--lab", f"ciliary={chart_lab.lab.layout.state_dir}"] if lab_mode(chart_lab.lab) == KUBE_PROXY_REPLACEMENT \
        else []
    out = run("bench/bench_kube_proxy.py", *attach, prefix=chart_lab.lab.layout.prefix, timeout=900)
    if attach:
        assert f"lab: attached to {chart_lab.lab.layout.state_dir}" in out, out
    number = r"[0-9.,]+ ?(s|/s|MiB) \(load \d+\)"
    for what in ("program 50 Services, from first create", "one Service change at 50 (median of 3)", "  slowest of them",
                 "CRR ClusterIP from a pod, 10 Services", "RR NodePort from the world host, 50 Services",
                 "RSS at 50 Services x 3: agent vs kube-proxy"):
        assert re.search(rf"^{re.escape(what)}\s+{number}\s+{number}\s+[0-9.]+x$", out, re.M), out
    assert not list(ROOT.glob(".lab-benchkp-*")), "the bench left its lab directory"
    assert chart_lab.kubectl("get", "namespace", "kpb").returncode != 0, "the bench left its namespace"


def test_metrics_bench_smoke() -> None:
    out = run("bench/bench_metrics.py")
    for label in ("agent at its most series", "agent padded to --series 6000"):
        assert re.search(rf"^{label}: \d+ series, \d+ bytes; Prometheus scrape_duration_seconds over [1-9]\d* scrapes: "
                         r"median [0-9.]+ ms, .*up=1;", out, re.M), out


def test_dns_proxy_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_dns_proxy.py", lab=chart_lab)
    row = re.search(r"^\s*4\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+/[0-9.]+\s+[0-9.]+/[0-9.]+\s+\d+"
                    r"\s+\d+/\d+\s+[0-9.]+/[0-9.]+\s*$", out, re.M)
    assert row, out
    assert float(row[1]) > 0 and float(row[2]) > 0, "no answer direct or through the proxy"
    assert not list(ROOT.glob(".lab-benchdns-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "benchdns").returncode != 0, "the bench left its namespace"
