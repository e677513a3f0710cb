"""Shared by the real-node tests: the built binaries and images, required (a failure under CI)."""

from __future__ import annotations

from pathlib import Path

import suite_rules
from ciliary.lab import images, tools
from ciliary.lab.nodebins import NodeBinaries

ROOT = Path(__file__).resolve().parents[3]


def node_binaries() -> NodeBinaries:
    """Every real-node binary; a missing one fails under CI and skips elsewhere (tests/suite_rules.py)."""
    for tool in (*tools.NODE_TOOLS, "runc", "mmdebstrap"):
        suite_rules.require_tool(tool)
    return NodeBinaries.discover()


def lab_images() -> list[images.BuiltImage]:
    """The lab's images (built by the set-up; built here, cached, if the set-up has not yet)."""
    node_binaries()
    return images.build_all(log=False)
