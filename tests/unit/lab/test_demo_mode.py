"""``make demo``'s arguments: real kubelets always; the process-lab demo is gone and says so."""

from __future__ import annotations

import pytest

from ciliary.lab.demo import check_args
from ciliary.lab.lab import LabError


def test_make_demo_takes_no_argument_or_the_old_real_nodes_flag() -> None:
    check_args([])
    check_args(["--real-nodes"])


def test_the_process_lab_demo_is_refused_with_where_to_go() -> None:
    with pytest.raises(LabError, match="process-lab demo is gone: `make demo` runs the scene on real kubelets"):
        check_args(["--process"])


@pytest.mark.parametrize("args", [["--proces"], ["--real-nodes", "extra"]])
def test_unknown_flags_are_refused(args: list[str]) -> None:
    with pytest.raises(LabError, match="usage"):
        check_args(args)
