"""The e2e lab fixture: a real lab (control plane, nodes, pods, world host) for real traffic.

One lab per session under its own prefix and state directory
(``.lab-e2e-<pid>``, see ``ciliary.lab.sessions``), so it never touches a lab the
user (or another session) has running; it is taken down after the session, also
when tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary.lab import sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import CONTROL_PLANE_TOOLS, Binaries, LabLayout
from ciliary.lab.tools import LAB_SYSTEM_TOOLS
from lab_harness import LabHandle

ROOT = Path(__file__).resolve().parents[1]


def e2e_layout() -> LabLayout:
    return sessions.session_layout(ROOT, "e2e", "e")


@pytest.fixture(scope="session")
def lab(tool) -> Iterator[LabHandle]:
    for name in (*CONTROL_PLANE_TOOLS, *LAB_SYSTEM_TOOLS):
        tool(name)
    sessions.reap_stale(ROOT, "e2e", "e")
    handle = LabHandle(Lab(e2e_layout(), Binaries.discover()))
    try:
        handle.lab.up(2, log=False)
        yield handle
    finally:
        handle.lab.down(log=False)
