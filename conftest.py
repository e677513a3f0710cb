"""Root pytest configuration: privileged suites need root, and under ``CI`` nothing may quietly not run.

Tests under ``tests/integration`` and ``e2e`` are marked ``integration`` / ``e2e``
by their path (if they lack the marker). Run by a non-root user they are skipped,
loudly; under ``CI`` (``CI=true``) that is an error instead, because CI runs as root.

Every run ends with a line counting the skipped, xfailed and xpassed tests and
lists each with its reason; under ``CI`` any of them that is not in
``tests/skip_allowlist.txt`` fails the run, and so does a run that collected no
tests. The rules themselves live in ``tests/suite_rules.py`` (pure, unit-tested).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))

import suite_rules  # noqa: E402

#: the session's real-node lab with Ciliary installed by its chart (``chart_lab``, ``chart_installed``)
pytest_plugins = ("realnode_lab",)

PRIVILEGED_DIRS = {"integration": ROOT / "tests" / "integration", "e2e": ROOT / "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, directory in PRIVILEGED_DIRS.items():
            if item.path.is_relative_to(directory) and not item.get_closest_marker(marker):
                item.add_marker(getattr(pytest.mark, marker))
    if os.geteuid() == 0:
        return
    privileged = [i for i in items if i.get_closest_marker("integration") or i.get_closest_marker("e2e")]
    if privileged and suite_rules.under_ci():
        raise pytest.UsageError(f"CI: {len(privileged)} integration/e2e tests need root (network namespaces, "
                                "eBPF, control plane); CI must run the suite as root")
    skip = pytest.mark.skip(reason="needs root (network namespaces, eBPF, control plane)")
    for item in privileged:
        item.add_marker(skip)


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail) or "xfail"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


_NOT_RUN: list[suite_rules.NotRun] = []
"""Every test (or module) of this session that was skipped, xfailed or xpassed."""


def _record(report: pytest.TestReport | pytest.CollectReport) -> None:
    outcome = None
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed" if report.passed else None
    elif report.skipped:
        outcome = "skipped"
    if outcome is not None:
        _NOT_RUN.append(suite_rules.NotRun(report.nodeid, outcome, _reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.exitstatus = suite_rules.ci_exit_status(int(exitstatus), _NOT_RUN, suite_rules.load_allowlist(),
                                                    ci=suite_rules.under_ci())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    ci = suite_rules.under_ci()
    lines = suite_rules.summary_lines(_NOT_RUN, suite_rules.load_allowlist(), ci=ci)
    terminalreporter.section("tests that did not run")
    for line in lines:
        terminalreporter.write_line(line)
    if ci and exitstatus == suite_rules.EXIT_NO_TESTS:
        terminalreporter.write_line("CI: no tests were collected: the run fails")


@pytest.fixture(scope="session")
def tool() -> Callable[[str], Path]:
    """``tool("etcd")`` -> its path; missing: the test fails under CI, skips otherwise (tests/suite_rules.py)."""
    return suite_rules.require_tool


# Property tests explore the same examples on every run (reproducible CI); run
# `pytest --hypothesis-seed=random`-style exploration locally with HYPOTHESIS_PROFILE=explore.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, database=None)
_hypothesis_settings.register_profile("explore")
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
