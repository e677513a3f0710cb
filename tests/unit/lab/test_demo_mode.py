"""Which lab ``make demo`` brings up: real kubelets by default, the process lab only when asked."""

from __future__ import annotations

import pytest

from ciliary.lab.demo import real_nodes_wanted
from ciliary.lab.lab import LabError


def test_make_demo_is_the_real_node_lab_by_default() -> None:
    assert real_nodes_wanted([], {}) is True
    assert real_nodes_wanted(["--real-nodes"], {}) is True


def test_the_process_lab_is_a_named_mode() -> None:
    assert real_nodes_wanted(["--process"], {}) is False
    assert real_nodes_wanted([], {"CILIARY_DEMO_PROCESS": "1"}) is False
    # an explicit flag beats the environment
    assert real_nodes_wanted(["--real-nodes"], {"CILIARY_DEMO_PROCESS": "1"}) is True


@pytest.mark.parametrize("args", [["--proces"], ["--process", "--real-nodes"], ["extra"]])
def test_unknown_or_contradictory_flags_are_refused(args: list[str]) -> None:
    with pytest.raises(LabError, match="usage"):
        real_nodes_wanted(args, {})
