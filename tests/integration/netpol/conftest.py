"""Prints the cyclonus differential's case count in the run's summary (it is the test's evidence)."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    module = sys.modules.get("test_cyclonus_differential")
    summary = getattr(module, "summary", None)
    if summary is not None and module is not None and module.COUNTS["sets"]:
        terminalreporter.write_line(summary())
