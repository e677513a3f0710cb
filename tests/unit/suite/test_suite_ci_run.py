"""The CI rules end to end: pytest in a subprocess, with the repository's root conftest, on tiny test files.

Under ``CI=true`` a skip, an xfail, a module skipped at collection and a run without
tests fail the run; an allow-listed skip does not; off CI a skip is only counted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

TINY = """
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("no such thing here")
"""


def run(tmp_path: Path, test_text: str, *, ci: bool, allow: str = "") -> subprocess.CompletedProcess[str]:
    """pytest on ``tests/test_tiny.py`` in a copy of the suite's machinery (root conftest, suite_rules, realnode_lab)."""
    (tmp_path / "tests").mkdir(exist_ok=True)
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(ROOT / "tests" / "suite_rules.py", tmp_path / "tests" / "suite_rules.py")
    shutil.copy(ROOT / "tests" / "realnode_lab.py", tmp_path / "tests" / "realnode_lab.py")
    (tmp_path / "tests" / "skip_allowlist.txt").write_text("# tiny\n" + allow)
    (tmp_path / "tests" / "test_tiny.py").write_text(test_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CI", "PYTEST_"))}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    done = run(tmp_path, TINY, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 skipped, 0 xfailed, 0 xpassed (0 allow-listed" in done.stdout
    assert "SKIPPED tests/test_tiny.py::test_skips: no such thing here [NOT ALLOWED under CI]" in done.stdout


def test_an_allow_listed_skip_passes_under_ci(tmp_path: Path) -> None:
    done = run(tmp_path, TINY, ci=True, allow="tests/test_tiny.py::test_skips  # nothing to test here\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped, 0 xfailed, 0 xpassed (1 allow-listed" in done.stdout
    assert "[allow-listed: nothing to test here]" in done.stdout


def test_off_ci_a_skip_is_counted_not_failed(tmp_path: Path) -> None:
    done = run(tmp_path, TINY, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped, 0 xfailed, 0 xpassed" in done.stdout


@pytest.mark.parametrize("text", [
    "import pytest\n\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    assert False\n",
    "import pytest\npytest.skip('whole module', allow_module_level=True)\n\ndef test_x():\n    pass\n",
], ids=["xfail", "module-level-skip"])
def test_xfail_and_module_skips_fail_the_run_under_ci(tmp_path: Path, text: str) -> None:
    done = run(tmp_path, text, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT ALLOWED under CI" in done.stdout


def test_no_tests_fails_the_run_under_ci(tmp_path: Path) -> None:
    done = run(tmp_path, "x = 1\n", ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "CI: no tests were collected" in done.stdout
    assert run(tmp_path, "x = 1\n", ci=False).returncode == 5
