"""`make demo` works as shown: the Star Wars scene from a fresh lab, checked line by line.

``make demo`` is the real-node lab: kubelets and containerd per node, Ciliary installed by its Helm chart. The
drop shows in ``ciliary observe``, ``ciliary policy trace`` names the deciding rule, and the L7 flows are read by
the real ``hubble`` CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ciliary.lab import sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
REAL_NODE_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "kubelet", "kube-scheduler", "kube-proxy",
                   "registry", "coredns", "helm", "runc", "mmdebstrap")


def run_demo(*args: str, kind: str, letter: str, timeout: float) -> str:
    """The demo in a lab of its own (taken down afterwards, also on failure); its output without colours."""
    sessions.reap_stale(ROOT, kind, letter)
    layout = sessions.session_layout(ROOT, kind, letter)
    env = {**os.environ, "CILIARY_LAB_DIR": str(layout.state_dir), "CILIARY_LAB_PREFIX": layout.prefix}
    try:
        out = subprocess.run([sys.executable, "-m", "ciliary.lab.demo", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
        print(text)  # the demo as a user sees it (pytest -s)
        assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
        return text
    finally:
        Lab(layout, Binaries.discover()).down(log=False)


def assert_the_scene(text: str) -> None:
    before_policy, after_policy = text.split("The tiefighter (org=empire) lands")
    after_policy = after_policy.split("Apply an L7 policy")[0]
    before_policy = before_policy.split("Without a policy every ship may land")[1]
    assert before_policy.count("Ship landed") == 2 and "timed out" not in before_policy
    assert after_policy.count("Ship landed") == 1 and "timed out" in after_policy
    assert '"enforcing": true' in text


def test_make_demo_runs_the_scene_on_real_kubelets_with_ciliary_installed_by_its_chart(tool):
    for name in REAL_NODE_TOOLS:
        tool(name)
    text = run_demo(kind="demo", letter="d", timeout=900)
    assert "ciliary lab up --real-nodes" in text
    assert "helm install ciliary-crds, ciliary" in text
    pods = text.split("$ kubectl get pods -n kube-system -o wide")[1].split("==")[0]
    for node in ("node-1", "node-2"):
        assert re.search(rf"ciliary-agent-\S+\s+1/1\s+Running\s.*\s{node}\s", pods), pods
    # every container ready (the operator pod has two)
    assert re.search(r"ciliary-operator-\S+\s+(\d)/\1\s+Running", pods), pods
    assert re.search(r"ciliary-etcd-0\s+1/1\s+Running", pods), pods
    assert_the_scene(text)
    # the CLI after `eval $(ciliary lab env)`: the chart's etcd through the forwarded port, each agent via its pod
    assert "$ eval $(ciliary lab env)" in text
    assert_flows_and_traces(text)
    # the L7 step runs here too: node-1's Envoy answers, the real hubble CLI reads both L7 flows from the relay
    l7 = text.split("Apply an L7 policy")[1]
    assert "Ship landed" in l7 and "HTTP/1.1 403 Forbidden Access denied" in l7, l7
    assert "$ hubble observe --pod default/deathstar" in l7, l7
    assert "POST /v1/request-landing => 200 FORWARDED" in l7 and "PUT /v1/exhaust-port => 403 DROPPED" in l7, l7


def assert_flows_and_traces(text: str) -> None:
    """``ciliary observe`` shows the xwing's drop; ``ciliary policy trace`` denies it and names rule1 for the
    tiefighter, both from the nodes' datapaths."""
    assert re.search(r"default/xwing:\d+ \(ID:\d+\) -> default/deathstar:80 .* DROPPED \(POLICY_DENIED\)", text)
    traces = text.split("$ ciliary policy trace --src default/xwing")[1].split("Apply an L7 policy")[0]
    denied, allowed = traces.split("$ ciliary policy trace --src default/tiefighter")
    assert denied.split("\n", 1)[1].startswith("DENIED (from the datapath"), denied
    assert allowed.split("\n", 1)[1].startswith("ALLOWED (from the datapath"), allowed
    assert "CiliumNetworkPolicy default/rule1 rule 0 ingress[0]" in allowed, allowed
