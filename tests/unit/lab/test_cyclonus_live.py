"""The cyclonus live run's tag list (``e2e/conformance/cyclonus.txt``), the ``cyclonus generate`` command
line built from it, and the reading of cyclonus's case listing and JUnit report."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.lab import cyclonus_live
from ciliary.lab.conformance import FocusList
from ciliary.lab.cyclonus_live import Case, Settings, TagListError
from ciliary.lab.lab import LabError

ROOT = Path(__file__).resolve().parents[3]
LIST = ROOT / "e2e" / "conformance" / "cyclonus.txt"

#: what the pinned cyclonus (setup/versions.env) prints before it runs (two of the list's cases)
LISTING = """testing 2 cases

test #1: egress: deny all
 - tags: deny-all, direction, egress, rule
test #2: Create/delete pod
 - tags: action, create-pod, delete-pod
starting test case #1
evaluating test case: egress: deny all
step 1 on all available ports/protocols:
0 wrong, 36 ignored, 288 correct
finished policy #1
starting test case #2
evaluating test case: Create/delete pod
step 1 on all available ports/protocols:
0 wrong, 36 ignored, 288 correct
step 2 on all available ports/protocols:
Discrepancy found:4 wrong, 36 ignored, 284 correct
step 3 on all available ports/protocols:
0 wrong, 36 ignored, 288 correct
finished policy #2
"""
#: its JUnit file (go-junit-report's layout): one testcase per case, in order
JUNIT = """<testsuite tests="2" failures="1" time="" name="cyclonus">
    <properties></properties>
    <testcase classname="" name="egress: deny all" time=""></testcase>
    <testcase classname="" name="Create/delete pod" time="">
        <failure message="" type=""></failure>
    </testcase>
</testsuite>"""


def test_the_repository_list_is_valid_and_decides_what_it_must() -> None:
    tags = cyclonus_live.read_tags(LIST)
    assert tags.focus and set(tags.focus) <= cyclonus_live.VALID_TAGS
    assert {"sctp", "peer-ipblock"} <= set(tags.skip)  # no SCTP in this kernel; the documented ipBlock difference
    # the list replaces cyclonus's default --exclude: each default is either run or left out with a reason
    assert set(cyclonus_live.CYCLONUS_DEFAULT_EXCLUDES) <= set(tags.focus) | set(tags.skip)
    assert not set(tags.focus) & set(tags.skip)


@pytest.mark.parametrize(("text", "complaint"), [
    ("peer-pods\n# why\n!sctp\n!bogus-tag\n", "unknown cyclonus tags ['bogus-tag']"),
    ("peer-pods\n# why\n!sctp\n\n!udp\n", "exclusions without a reason: ['!udp']"),
    ("# why\n!sctp\n", "includes no tag"),
])
def test_a_bad_list_is_refused_with_its_path(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "tags.txt"
    path.write_text(text)
    with pytest.raises(TagListError, match=r"tags\.txt: ") as raised:
        cyclonus_live.read_tags(path)
    assert complaint in str(raised.value)
    assert raised.value.path == path


def test_generate_argv_passes_the_list_and_the_settings() -> None:
    tags = FocusList(("peer-pods", "action"), ("sctp", "multi-peer"))
    argv = cyclonus_live.generate_argv(Path("/bin/cyclonus"), tags, Settings(), junit=Path("/tmp/j.xml"))
    assert argv[:2] == ["/bin/cyclonus", "generate"]
    assert "--include=peer-pods,action" in argv and "--exclude=sctp,multi-peer" in argv
    assert "--server-protocol=TCP,UDP" in argv and "--server-port=80,81" in argv
    assert "--destination-type=pod-ip" in argv and "--job-timeout-seconds=3" in argv
    assert "--ignore-loopback" in argv
    assert "--cleanup-namespaces" in argv and "--junit-results-file=/tmp/j.xml" in argv
    assert "--mock" not in argv


def test_an_empty_exclusion_list_is_still_passed_so_cyclonus_drops_its_defaults() -> None:
    argv = cyclonus_live.generate_argv(Path("c"), FocusList(("peer-pods",), ()), Settings(destination_type="",
                                                                                       ignore_loopback=False),
                                       dry_run=True)
    assert "--exclude=" in argv
    assert not any(a.startswith(("--destination-type", "--ignore-loopback")) for a in argv)
    assert argv[-2:] == ["--mock", "--dry-run"] and "--cleanup-namespaces" not in argv


def test_the_output_gives_counts_and_the_failed_cases_with_their_tags() -> None:
    cases = cyclonus_live.listed_cases(LISTING)
    assert cases == [Case(1, "egress: deny all", ("deny-all", "direction", "egress", "rule")),
                     Case(2, "Create/delete pod", ("action", "create-pod", "delete-pod"))]
    assert cyclonus_live.case_verdicts(LISTING) == {1: (0, 288), 2: (4, 860)}
    result = cyclonus_live.run_result(LISTING, 61.2, JUNIT)
    assert (result.passed, result.failed, result.wrong_cells, result.correct_cells) == (1, 1, 4, 1148)
    assert result.failures == (cases[1],)
    assert result.line() == ("cyclonus generate: 2 cases, 1 passed, 1 failed; probe cells 1148 correct, 4 wrong "
                             "(61 s)")


def test_a_stopped_run_counts_the_cases_it_finished() -> None:
    stopped = LISTING[:LISTING.index("finished policy #2")]
    result = cyclonus_live.run_result(stopped, 10.0)  # no JUnit report: cyclonus writes it at the end
    assert (result.passed, result.failed, result.selected) == (1, 0, 2)
    assert result.line().endswith("(stopped: 1 of 2 cases finished)")


def test_a_junit_report_that_disagrees_with_the_output_is_an_error() -> None:
    with pytest.raises(LabError, match="disagrees"):
        cyclonus_live.run_result(LISTING, 1.0, JUNIT.replace('<failure message="" type=""></failure>', ""))


def test_main_refuses_a_bad_list_before_touching_any_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tags.txt"
    path.write_text("peer-pods\n!sctp\n")
    assert cyclonus_live.main(["--tags-file", str(path), "--dry-run"]) == 1
    assert "exclusions without a reason: ['!sctp']" in capsys.readouterr().err
