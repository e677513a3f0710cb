"""The CI rules of the test suite (tests/suite_rules.py): allow-list parsing and matching, exit status."""

from __future__ import annotations

import pytest

import suite_rules
from suite_rules import NotRun

ALLOW = {
    "tests/integration/x/test_a.py::test_one": "needs two NICs",
    "tests/integration/y/test_b.py::*": "whole module needs a GPU",
}


def skipped(nodeid: str, outcome: str = "skipped") -> NotRun:
    return NotRun(nodeid, outcome, "because")


def test_parse_allowlist_needs_a_reason_for_every_entry() -> None:
    text = "# header\n\n  tests/a.py::test_x   # the reason  \ntests/b.py::* # another\n"
    assert suite_rules.parse_allowlist(text) == {"tests/a.py::test_x": "the reason", "tests/b.py::*": "another"}
    with pytest.raises(suite_rules.AllowlistError, match=r":2: an entry needs its reason"):
        suite_rules.parse_allowlist("# ok\ntests/a.py::test_x\n")
    with pytest.raises(suite_rules.AllowlistError, match="reason"):
        suite_rules.parse_allowlist("tests/a.py::test_x #   \n")
    with pytest.raises(suite_rules.AllowlistError, match="no spaces"):
        suite_rules.parse_allowlist("tests/a.py test_x # why\n")


def test_the_shipped_allowlist_parses() -> None:
    suite_rules.load_allowlist()


def test_allowed_reason_matches_node_ids_patterns_and_collection_skips() -> None:
    assert suite_rules.allowed_reason("tests/integration/x/test_a.py::test_one", ALLOW) == "needs two NICs"
    assert suite_rules.allowed_reason("tests/integration/x/test_a.py::test_two", ALLOW) is None
    assert suite_rules.allowed_reason("tests/integration/y/test_b.py::test_any[p1]", ALLOW) == \
        "whole module needs a GPU"
    # a module skipped at collection reports the module's node id
    assert suite_rules.allowed_reason("tests/integration/y/test_b.py", ALLOW) == "whole module needs a GPU"
    assert suite_rules.allowed_reason("tests/integration/x/test_a.py", ALLOW) is None


def test_xfail_and_xpass_count_like_skips() -> None:
    not_run = [skipped("t.py::a", "xfailed"), skipped("t.py::b", "xpassed"),
               skipped("tests/integration/x/test_a.py::test_one")]
    assert [n.nodeid for n in suite_rules.unexplained(not_run, ALLOW)] == ["t.py::a", "t.py::b"]


@pytest.mark.parametrize(("status", "not_run", "ci", "expected"), [
    (0, [], True, 0),
    (0, [skipped("t.py::a")], True, 1),
    (0, [skipped("tests/integration/x/test_a.py::test_one")], True, 0),
    (0, [skipped("t.py::a")], False, 0),
    (5, [], True, 1),   # no tests collected
    (5, [], False, 5),
    (1, [skipped("t.py::a")], True, 1),
    (2, [], True, 2),   # interrupted stays interrupted
])
def test_ci_exit_status(status: int, not_run: list[NotRun], ci: bool, expected: int) -> None:
    assert suite_rules.ci_exit_status(status, not_run, ALLOW, ci=ci) == expected


def test_summary_counts_and_names_every_test_that_did_not_run() -> None:
    not_run = [skipped("t.py::a"), skipped("tests/integration/x/test_a.py::test_one"), skipped("t.py::c", "xfailed")]
    lines = suite_rules.summary_lines(not_run, ALLOW, ci=True)
    assert lines[0] == "2 skipped, 1 xfailed, 0 xpassed (1 allow-listed in tests/skip_allowlist.txt)"
    assert any("t.py::a" in line and "NOT ALLOWED under CI" in line for line in lines)
    assert any("test_one" in line and "allow-listed: needs two NICs" in line for line in lines)
    assert lines[-1].startswith("CI: 2 test(s) did not run")
    assert suite_rules.summary_lines([], ALLOW, ci=True) == [
        "0 skipped, 0 xfailed, 0 xpassed (0 allow-listed in tests/skip_allowlist.txt)"]


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                           ("", False), ("false", False), ("0", False)])
def test_under_ci(value: str, ci: bool) -> None:
    assert suite_rules.under_ci({"CI": value}) is ci
    assert suite_rules.under_ci({}) is False


def test_a_missing_tool_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CILIARY_CACHE", str(tmp_path))  # an empty cache: no built tool is there
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI: etcd is missing \(looked for .*etcd-v.*/etcd\): "
                                                    r"setup/build-go-tools.sh builds it"):
        suite_rules.require_tool("etcd")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="helm is missing"):
        suite_rules.require_tool("helm")
