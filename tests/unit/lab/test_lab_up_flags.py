"""``ciliary lab up``: real kubelets by default; the process lab only with ``--process`` or when it already runs."""

from __future__ import annotations

import pytest

from ciliary.cli.errors import UserError
from ciliary.cli.lab_commands import process_lab_wanted
from ciliary.cli.main import build_parser


def test_real_nodes_are_the_default() -> None:
    args = build_parser().parse_args(["lab", "up"])
    assert (args.process, args.real_nodes) == (False, False)
    assert process_lab_wanted(False, False, {}) is False
    assert process_lab_wanted(False, True, {}) is False  # the old flag still works
    assert process_lab_wanted(False, False, {"nodes": 2, "real_nodes": True}) is False


def test_the_process_lab_when_asked_or_when_it_already_runs() -> None:
    assert build_parser().parse_args(["lab", "up", "--process"]).process is True
    assert process_lab_wanted(True, False, {}) is True
    assert process_lab_wanted(False, False, {"nodes": 2}) is True  # a second `lab up` completes it
    assert process_lab_wanted(False, True, {"nodes": 2}) is False  # real nodes asked: reallab refuses, naming why


def test_both_kinds_at_once_are_refused() -> None:
    with pytest.raises(UserError, match="--process .* and --real-nodes .* exclude each other"):
        process_lab_wanted(True, True, {})
