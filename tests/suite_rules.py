"""What the test suite tolerates: skips, xfails, missing tools, no tests — strict under ``CI``, lenient off it.

On the CI machine (``CI=true``, as ``.ci/run`` gets it: root, everything
installed) a test that does not run is a defect, so:

- a skipped, xfailed or xpassed test fails the run unless its node id matches an
  entry of ``tests/skip_allowlist.txt`` (each entry with its reason);
- a missing tool (:func:`require_tool`) fails the test, naming the tool and the
  set-up step; off CI it skips with the same message;
- a run that collected no tests (pytest's exit 5) fails;
- privileged tests (integration, e2e) run by a non-root user fail the run; off CI
  they are skipped, loudly.

The allow-list logic is pure (:func:`parse_allowlist`, :func:`allowed_reason`,
:func:`unexplained`, :func:`ci_exit_status`); the root ``conftest.py`` wires it to
pytest's hooks.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliary.lab import tools

ALLOWLIST_FILE = Path(__file__).resolve().parent / "skip_allowlist.txt"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
NOT_RUN_OUTCOMES = ("skipped", "xfailed", "xpassed")
EXIT_NO_TESTS = 5
EXIT_TESTS_FAILED = 1


class AllowlistError(ValueError):
    """A line of the allow-list file is not ``<node id pattern>  # <reason>``."""

    def __init__(self, line_number: int, line: str, problem: str) -> None:
        super().__init__(f"{ALLOWLIST_FILE.name}:{line_number}: {problem}: {line!r}")
        self.line_number = line_number
        self.line = line


@dataclass(frozen=True)
class NotRun:
    """A test (or a whole module, when skipped at collection) that did not run as a plain pass or fail."""

    nodeid: str
    outcome: str  # "skipped" | "xfailed" | "xpassed"
    reason: str


def under_ci(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() in TRUE_WORDS


def parse_allowlist(text: str) -> dict[str, str]:
    """Node id pattern (fnmatch) -> reason. Every entry needs a reason after `` # ``; ``#`` lines are comments."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(" #")
        pattern, reason = pattern.strip(), reason.strip()
        if not sep or not reason:
            raise AllowlistError(number, raw, "an entry needs its reason after ' # '")
        if " " in pattern:
            raise AllowlistError(number, raw, "a node id pattern has no spaces")
        entries[pattern] = reason
    return entries


def load_allowlist(path: Path = ALLOWLIST_FILE) -> dict[str, str]:
    return parse_allowlist(path.read_text()) if path.exists() else {}


def allowed_reason(nodeid: str, allowlist: Mapping[str, str]) -> str | None:
    """The reason ``nodeid`` may not run, or None when it must run.

    A pattern matches the node id itself or, for a module skipped at collection
    (node id ``path.py``), any test inside it matched by ``path.py::*``.
    """
    for pattern, reason in allowlist.items():
        if fnmatch.fnmatchcase(nodeid, pattern):
            return reason
        if "::" not in nodeid and pattern.startswith(nodeid + "::") and pattern.endswith("*"):
            return reason
    return None


def unexplained(not_run: Iterable[NotRun], allowlist: Mapping[str, str]) -> list[NotRun]:
    """The tests that did not run and are not on the allow-list (xfail and xpass count like skips)."""
    return [n for n in not_run if allowed_reason(n.nodeid, allowlist) is None]


def ci_exit_status(exit_status: int, not_run: Iterable[NotRun], allowlist: Mapping[str, str],
                   *, ci: bool) -> int:
    """The run's exit status after the CI rules: a non-allow-listed skip or no tests at all fail it."""
    if not ci:
        return exit_status
    if exit_status == EXIT_NO_TESTS:
        return EXIT_TESTS_FAILED
    if exit_status == 0 and unexplained(not_run, allowlist):
        return EXIT_TESTS_FAILED
    return exit_status


def summary_lines(not_run: list[NotRun], allowlist: Mapping[str, str], *, ci: bool) -> list[str]:
    """What ``make test`` prints at the end: the counts, then every test that did not run and why."""
    counts = {o: sum(1 for n in not_run if n.outcome == o) for o in NOT_RUN_OUTCOMES}
    bad = unexplained(not_run, allowlist)
    lines = [f"{counts['skipped']} skipped, {counts['xfailed']} xfailed, {counts['xpassed']} xpassed "
             f"({len(not_run) - len(bad)} allow-listed in tests/{ALLOWLIST_FILE.name})"]
    for n in not_run:
        why = allowed_reason(n.nodeid, allowlist)
        tag = f"allow-listed: {why}" if why else ("NOT ALLOWED under CI" if ci else "not allow-listed")
        lines.append(f"  {n.outcome.upper()} {n.nodeid}: {n.reason} [{tag}]")
    if ci and bad:
        lines.append(f"CI: {len(bad)} test(s) did not run and are not in tests/{ALLOWLIST_FILE.name}: "
                     "the run fails")
    return lines


def require_tool(tool: str) -> Path:
    """The tool's path; a missing tool fails the test under ``CI`` and skips it otherwise (same message)."""
    try:
        return tools.find(tool)
    except (tools.ToolMissingError, tools.VersionsFileError) as exc:
        problem = str(exc)
    if under_ci():
        pytest.fail(f"CI: {problem}", pytrace=False)
    pytest.skip(problem)
