"""Every e2e module that uses the ``lab`` fixture says which lab it runs on (e2e/conftest.py): a ``#:`` comment
above its ``REAL_NODES = True`` says why it passes on the session's real-node lab, or above ``REAL_NODES = False``
why it brings up a lab of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[3] / "e2e"
USES_LAB = re.compile(r"^def \w+\((?:[^)]*\b)?lab\b[,:)]", re.MULTILINE)
MODULES = sorted(p for p in E2E.glob("test_*.py") if USES_LAB.search(p.read_text()))


def test_the_lab_fixture_is_used_by_the_modules_expected() -> None:
    assert {"test_policy_enforcement", "test_netpol_enforcement", "test_services"} <= {p.stem for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_each_module_declares_its_lab_and_says_why_not_real_nodes(path: Path) -> None:
    lines = path.read_text().splitlines()
    declared = [i for i, line in enumerate(lines) if re.match(r"REAL_NODES = (True|False)$", line)]
    assert len(declared) == 1, f"{path.name}: one `REAL_NODES = True|False` line at module level"
    above = lines[declared[0] - 1]
    assert above.startswith("#: "), f"{path.name}: a `#:` comment above REAL_NODES says why (or that it passes)"


def test_the_session_lab_runs_without_kube_proxy_when_a_module_needs_it() -> None:
    import types

    import realnode_lab

    plain, needs = types.SimpleNamespace(), types.SimpleNamespace(REAL_NODES_MODE="kube-proxy-replacement")
    assert realnode_lab.wanted_mode([plain], {}) == "kube-proxy"
    assert realnode_lab.wanted_mode([plain, needs], {}) == "kube-proxy-replacement"
    assert realnode_lab.wanted_mode([needs], {"CILIARY_E2E_REAL_NODES_MODE": "kube-proxy"}) == "kube-proxy"
    assert realnode_lab.wanted_mode([plain], {"CILIARY_E2E_REAL_NODES_MODE": "kube-proxy-replacement"}) == \
        "kube-proxy-replacement"
    with pytest.raises(ValueError):
        realnode_lab.wanted_mode([], {"CILIARY_E2E_REAL_NODES_MODE": "iptables"})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_a_module_names_only_a_known_real_node_mode(path: Path) -> None:
    modes = re.findall(r'^REAL_NODES_MODE = "([^"]*)"$', path.read_text(), re.MULTILINE)
    assert modes in ([], ["kube-proxy-replacement"]), f"{path.name}: REAL_NODES_MODE {modes}"
    if modes:
        assert "REAL_NODES = True" in path.read_text(), f"{path.name}: a real-node mode without REAL_NODES = True"
