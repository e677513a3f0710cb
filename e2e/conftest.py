"""The e2e lab fixture: a real lab (control plane, nodes, pods, world host) for real traffic.

``lab`` is module-scoped and hands each module one of two session labs:

- the **real-node lab** (``chart_lab``, tests/realnode_lab.py: kubelets and containerd per node, Ciliary
  installed by its Helm chart; the same lab the chart and conformance tests use) for a module that sets
  ``REAL_NODES = True`` — the modules that pass there; ``chart_installed`` puts the release back if an
  earlier test removed it;
- the **process lab** (``ciliary lab up``: Ciliary's own pod runtime) for the others, each saying in its
  ``REAL_NODES`` comment why it does not run on real nodes yet.

``CILIARY_E2E_REAL_NODES=1`` puts every module on the real-node lab (to find out which pass there);
``CILIARY_E2E_LAB=<state dir>`` attaches to a real-node lab already up (tests/realnode_lab.py).

Each session lab has its own prefix and state directory (``.lab-e2e-<pid>``, ``.lab-chartnode-<pid>``,
see ``ciliary.lab.sessions``), so it never touches a lab the user (or another session) has running; it is
taken down after the session, also when tests fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary.lab import sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import CONTROL_PLANE_TOOLS, Binaries, LabLayout
from ciliary.lab.tools import LAB_SYSTEM_TOOLS
from lab_harness import LabHandle
from realnode_lab import ensure_installed, require_mode
from suite_rules import TRUE_WORDS

ROOT = Path(__file__).resolve().parents[1]
ALL_REAL_ENV = "CILIARY_E2E_REAL_NODES"


def e2e_layout() -> LabLayout:
    return sessions.session_layout(ROOT, "e2e", "e")


def on_real_nodes(module: object) -> bool:
    return bool(getattr(module, "REAL_NODES", False)) or os.environ.get(ALL_REAL_ENV, "").lower() in TRUE_WORDS


@pytest.fixture(scope="session")
def process_lab(tool) -> Iterator[LabHandle]:
    for name in (*CONTROL_PLANE_TOOLS, *LAB_SYSTEM_TOOLS):
        tool(name)
    sessions.reap_stale(ROOT, "e2e", "e")
    handle = LabHandle(Lab(e2e_layout(), Binaries.discover()))
    try:
        handle.lab.up(2, log=False)
        yield handle
    finally:
        handle.lab.down(log=False)


def namespaced_leftovers(handle: LabHandle) -> set[str]:
    """Namespaces and default-namespace pods, cluster policies (as ``kind/name``): what a module may leave."""
    out = handle.kubectl("get", "namespaces,pods,ciliumclusterwidenetworkpolicies", "-n", "default", "-o", "name",
                         check=False)
    return set(out.stdout.split()) if out.returncode == 0 else set()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabHandle]:
    if not on_real_nodes(request.module):
        yield request.getfixturevalue("process_lab")
        return
    chart = request.getfixturevalue("chart_lab")
    require_mode(chart.lab, request.module)
    ensure_installed(chart)
    handle = LabHandle(chart.lab)
    before = namespaced_leftovers(handle)
    yield handle
    # the real-node lab outlives the module (other modules, other suites): remove what the module made
    made = sorted(namespaced_leftovers(handle) - before)
    if made:
        handle.kubectl("delete", *made, "-n", "default", "--wait=true", "--timeout=180s", "--ignore-not-found",
                       check=False)
