"""The e2e lab fixture: the session's real-node lab (control plane, kubelets, pods, world host) for real traffic.

``lab`` is module-scoped and hands each module the **real-node lab** (``chart_lab``, tests/realnode_lab.py:
kubelets and containerd per node, Ciliary installed by its Helm chart; the same lab the chart and conformance
tests use); the release is put back first if an earlier test removed it, and what the module left in the
default namespace (namespaces, pods, cluster-wide policies) is deleted after it. A module that sets
``REAL_NODES = False`` asks for no ``lab``: it brings up a lab of its own (e2e/test_lab_kube_proxy.py).

``CILIARY_E2E_LAB=<state dir>`` attaches to a real-node lab already up (tests/realnode_lab.py). A module finding
the lab gone (its ``lab.json`` removed by an earlier test) fails saying so; nothing brings up another lab.

The session lab has its own prefix and state directory (``.lab-chartnode-<pid>``, see
``ciliary.lab.sessions``), so it never touches a lab the user (or another session) has running; it is taken
down after the session, also when tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab_harness import LabHandle
from realnode_lab import ensure_installed, require_mode


def namespaced_leftovers(handle: LabHandle) -> set[str]:
    """Namespaces and default-namespace pods, cluster policies (as ``kind/name``): what a module may leave."""
    out = handle.kubectl("get", "namespaces,pods,ciliumclusterwidenetworkpolicies", "-n", "default", "-o", "name",
                         check=False)
    return set(out.stdout.split()) if out.returncode == 0 else set()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabHandle]:
    if getattr(request.module, "REAL_NODES", True) is False:
        pytest.fail(f"{request.module.__name__} says REAL_NODES = False: it brings up its own lab, not `lab`",
                    pytrace=False)
    chart = request.getfixturevalue("chart_lab")
    if not chart.lab.layout.config_file.exists():
        pytest.fail(f"the session's real-node lab in {chart.lab.layout.state_dir} is gone (taken down by an earlier "
                    "test?): run the suite again", pytrace=False)
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
