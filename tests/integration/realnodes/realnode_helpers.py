"""Shared by the real-node tests: the built binaries and images, required (a failure under CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ciliary.lab import images
from ciliary.lab.nodebins import NodeBinaries, versions

ROOT = Path(__file__).resolve().parents[3]


def _missing(what: str) -> None:
    # CI runs set-up first, so a missing binary there is a set-up defect, never a reason to skip
    if os.environ.get("CI"):
        pytest.fail(f"{what} — setup/setup.sh builds it")
    pytest.skip(f"{what} — run setup/setup.sh")


def node_binaries() -> NodeBinaries:
    os.environ.setdefault("CILIARY_VERSIONS_FILE", str(ROOT / "setup" / "versions.env"))
    bins = NodeBinaries.discover(versions())
    missing = bins.missing()
    if missing:
        _missing("real-node binaries missing: " + ", ".join(map(str, missing)))
    return bins


def lab_images() -> list[images.BuiltImage]:
    """The lab's images (built by the set-up; built here, cached, if the set-up has not yet)."""
    node_binaries()
    return images.build_all(log=False)
