"""The compiler process: compile, verify and pin rendered programs with bcc, then exit.

Run by ``compiling`` as ``python -m ciliary.nodeagent.datapath.compiler``; the
only module of the agent that imports bcc. It exists so that clang/LLVM (their
library pages, ~55 MB resident once loaded, and the compile's heap) live in a
short-lived process instead of the agent.

Protocol: stdin holds a JSON list of jobs ``{hook, name, sha256, source,
pin_path[, prog_type, attach_type]}``. For each job, in order, the program is compiled (its pinned maps
are created, or reused when already pinned in bpffs: ``BPF_TABLE_PINNED``),
loaded as ``prog_type`` (default ``SCHED_CLS``; cgroup programs with their expected
``attach_type``; the kernel verifier runs) and pinned at ``pin_path``,
replacing whatever was pinned there. The first failure ends the run. The last
line of stdout is a JSON list of outcomes, one per job attempted:
``{"hook", "ok": true}`` or ``{"hook", "ok": false, "phase": "compile" |
"verify" | "pin", "message", "log", "errno"}``, where ``log`` is what bcc,
clang or the verifier printed for that job. Anything else bcc prints goes to
stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bcc import BPF

from ciliary.nodeagent.datapath import libbpf


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (bcc and libbpf print compiler and verifier logs there)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _failure(hook: str, phase: str, exc: BaseException, log: list[str]) -> dict[str, Any]:
    return {"hook": hook, "ok": False, "phase": phase, "message": str(exc), "log": "".join(log),
            "errno": getattr(exc, "errno", None) or 0}


def run_job(job: dict[str, Any], keep: list[Any]) -> dict[str, Any]:
    """Compile, verify and pin one program; the BPF object goes to ``keep`` (its fds stay open)."""
    hook = str(job["hook"])
    log: list[str] = []
    try:
        with _captured_stderr() as log:
            bpf = BPF(text=str(job["source"]).encode())
    # bcc raises bare Exception; the failure is passed back, not swallowed
    except Exception as exc:  # noqa: BLE001
        return _failure(hook, "compile", exc, log)
    keep.append(bpf)
    log = []
    try:
        with _captured_stderr() as log:
            fn = bpf.load_func(str(job["name"]).encode(), getattr(BPF, str(job.get("prog_type") or "SCHED_CLS")),
                               attach_type=int(job.get("attach_type", -1)))
    except Exception as exc:  # noqa: BLE001
        return _failure(hook, "verify", exc, log)
    pin_path = Path(job["pin_path"])
    try:
        with contextlib.suppress(FileNotFoundError):
            pin_path.unlink()
        libbpf.obj_pin(fn.fd, pin_path)
    except OSError as exc:
        return _failure(hook, "pin", exc, [])
    return {"hook": hook, "ok": True}


def main(stdin: TextIO = sys.stdin) -> int:
    jobs = json.loads(stdin.read())
    # bcc may print to fd 1: keep the real stdout for the outcome line only.
    outcome_fd = os.dup(1)
    os.dup2(2, 1)
    keep: list[Any] = []
    outcomes: list[dict[str, Any]] = []
    for job in jobs:
        outcomes.append(run_job(job, keep))
        if not outcomes[-1]["ok"]:
            break
    sys.stdout.flush()
    with os.fdopen(outcome_fd, "w") as out:
        out.write(json.dumps(outcomes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
