"""Labs owned by test sessions: one per process, found and removed again after a crash.

Each test session gets a lab directory ``<root>/.lab-<kind>-<pid>`` and a prefix
``<letter><pid % 100000>``, so concurrent sessions never share namespaces,
cgroups or ports. Labs of sessions whose process is gone are taken down first.
"""

from __future__ import annotations

import os
from pathlib import Path

from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries, LabLayout


def session_layout(root: Path, kind: str, letter: str) -> LabLayout:
    pid = os.getpid()
    return LabLayout(state_dir=root / f".lab-{kind}-{pid}", prefix=f"{letter}{pid % 100000}")


def reap_stale(root: Path, kind: str, letter: str) -> list[str]:
    """Take down labs of dead sessions of this kind; return their directories."""
    removed = []
    for path in sorted(root.glob(f".lab-{kind}-*")):
        pid_text = path.name.rsplit("-", 1)[1]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        layout = LabLayout(state_dir=path, prefix=f"{letter}{int(pid_text) % 100000}")
        Lab(layout, Binaries.discover()).down(log=False)
        removed.append(str(path))
    return removed
