"""Compile rendered programs in a short-lived child process, pinning each under its hash.

Called by ``engine``. The agent never runs clang itself: :func:`compile_and_pin`
starts ``python -m ciliary.nodeagent.datapath.compiler`` (see that module for
the protocol), which compiles, verifies and pins the programs in bpffs at the
paths given, then exits, taking LLVM's memory with it. The pinned program *is*
the cache: an engine finding the pin of a rendered hash adopts it and compiles
nothing, so a policy change never compiles. :func:`compile_count` counts clang
runs started from this process so tests and the bench can assert that.
Failures come back as :class:`errors.CompileFailed` / :class:`errors.VerifierRejected`
carrying the compiler or verifier log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ciliary.nodeagent import rendering
from ciliary.nodeagent.datapath import errors

log = logging.getLogger(__name__)

COMPILER_MODULE = "ciliary.nodeagent.datapath.compiler"
COMPILE_TIMEOUT_S = 300.0
_COMPILES = 0


def compile_count() -> int:
    """clang runs started from this process so far (one per program compiled)."""
    return _COMPILES


def _package_root() -> str:
    """The sys.path entry this process imported ``ciliary.nodeagent`` from."""
    return str(Path(__file__).resolve().parents[3])  # <root>/ciliary/nodeagent/datapath/compiling.py


def _child_env() -> dict[str, str]:
    """The agent's environment, with its own package first so the child runs the same code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
    return env


def compile_and_pin(jobs: Sequence[tuple[rendering.RenderedProgram, Path]]) -> None:
    """Compile, verify and pin each ``(program, pin_path)`` in one child process.

    Returns once every program is pinned; raises the typed error of the first
    program that failed (programs before it stay pinned under their hash).
    """
    global _COMPILES
    if not jobs:
        return
    payload = json.dumps([{"hook": p.hook, "name": p.name, "sha256": p.sha256, "source": p.source,
                           "pin_path": str(path), "prog_type": p.prog_type, "attach_type": p.attach_type}
                          for p, path in jobs])
    first = jobs[0][0]
    began = time.monotonic()
    try:
        child = subprocess.run([sys.executable, "-m", COMPILER_MODULE], input=payload, capture_output=True,
                               text=True, env=_child_env(), timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        _COMPILES += len(jobs)
        raise errors.CompileFailed(first.hook, first.sha256,
                                   f"the compiler process ran over {COMPILE_TIMEOUT_S:.0f} s") from exc
    outcomes = _outcomes(child)
    _COMPILES += len(jobs) if outcomes is None else len(outcomes)  # one clang run per job attempted
    if outcomes is None:
        raise errors.CompileFailed(first.hook, first.sha256,
                                   f"the compiler process exited with {child.returncode} without an outcome; "
                                   f"{child.stderr[-2000:]}")
    by_hook = {p.hook: p for p, _ in jobs}
    for outcome in outcomes:
        if not outcome.get("ok"):
            _raise_failure(by_hook[str(outcome["hook"])], outcome)
    if len(outcomes) < len(jobs):
        missing = jobs[len(outcomes)][0]
        raise errors.CompileFailed(missing.hook, missing.sha256, f"not compiled; {child.stderr[-2000:]}")
    log.info("Compiled %d program(s) in a child process", len(jobs),
             extra={"seconds": round(time.monotonic() - began, 2), "hashes": [p.sha256[:12] for p, _ in jobs]})


def _outcomes(child: subprocess.CompletedProcess[str]) -> list[dict[str, object]] | None:
    lines = child.stdout.strip().splitlines()
    if not lines:
        return None
    try:
        parsed = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _raise_failure(program: rendering.RenderedProgram, outcome: dict[str, object]) -> None:
    phase, message, text = outcome.get("phase"), str(outcome.get("message", "")), str(outcome.get("log", ""))
    if phase == "compile":
        raise errors.CompileFailed(program.hook, program.sha256, f"{message}; {text[-2000:]}")
    if phase == "verify":
        raise errors.VerifierRejected(program.hook, program.sha256, text or message)
    errno = outcome.get("errno")
    raise errors.PinFailed(program.hook, program.sha256, errno if isinstance(errno, int) else 0, message)
