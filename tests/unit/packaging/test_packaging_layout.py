"""Packaging keeps import path = file path, ships every package, and never shadows the stdlib."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found = set()
    for source_root in ("operator", "nodeagent", "e2e"):
        for init in (ROOT / source_root).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT / source_root).parts))
    return found


def test_every_package_on_disk_is_shipped():
    assert _packages_on_disk() <= set(CONFIG["packages"])


def test_package_dirs_equal_import_paths():
    for package, directory in CONFIG["package-dir"].items():
        if package == "ciliary.datapath_c":
            assert directory == "datapath_c"
            continue
        assert directory.endswith(package.replace(".", "/")), (package, directory)


def test_no_init_in_namespace_folders():
    for folder in ("operator", "nodeagent", "e2e", "operator/ciliary", "nodeagent/ciliary", "e2e/ciliary"):
        assert not (ROOT / folder / "__init__.py").exists(), folder


def test_stdlib_operator_is_not_shadowed_from_the_repo_root():
    out = subprocess.run([sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert not out.stdout.startswith(str(ROOT)) and out.stdout.strip().endswith("operator.py")


def test_datapath_sources_are_package_data():
    data = CONFIG["package-data"]["ciliary.datapath_c"]
    for pattern in data:
        assert list((ROOT / "datapath_c").glob(pattern)), pattern
