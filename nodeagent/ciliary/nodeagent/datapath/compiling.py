"""Compile rendered programs, once per rendered-source hash per process.

Called by ``engine``. A compiled :class:`CompiledProgram` holds the bcc ``BPF``
object (whose tables are the node's pinned maps) and, once loaded, the
verified program fd. :func:`compile_count` counts clang runs so tests and the
bench can assert that a policy change compiles nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from bcc import BPF

from ciliary.nodeagent import rendering
from ciliary.nodeagent.datapath import errors

_CACHE: dict[str, CompiledProgram] = {}
_COMPILES = 0


@dataclasses.dataclass
class CompiledProgram:
    hook: str
    name: str
    sha256: str
    bpf: Any
    """The bcc BPF object: ``bpf["cy_policy"]`` etc. are the pinned maps."""
    fn: Any = None
    """bcc function after :func:`load`: ``fn.fd`` is the verified program."""


def compile_count() -> int:
    """clang runs in this process so far."""
    return _COMPILES


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (bcc and libbpf print compiler and verifier logs there)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def compile_program(program: rendering.RenderedProgram) -> CompiledProgram:
    """The compiled object for ``program``, from the cache when its hash is known."""
    global _COMPILES
    cached = _CACHE.get(program.sha256)
    if cached is not None:
        return cached
    log: list[str] = []
    try:
        with _captured_stderr() as log:
            _COMPILES += 1
            bpf = BPF(text=program.source.encode())
    except Exception as exc:  # bcc raises bare Exception
        raise errors.CompileFailed(program.hook, program.sha256, f"{exc}; {''.join(log)[-2000:]}") from exc
    compiled = CompiledProgram(program.hook, program.name, program.sha256, bpf)
    _CACHE[program.sha256] = compiled
    return compiled


def load(compiled: CompiledProgram) -> Any:
    """Verify and load the entry function (once per compiled object)."""
    if compiled.fn is None:
        log: list[str] = []
        try:
            with _captured_stderr() as log:
                compiled.fn = compiled.bpf.load_func(compiled.name.encode(), BPF.SCHED_CLS)
        except Exception as exc:  # bcc raises bare Exception
            raise errors.VerifierRejected(compiled.hook, compiled.sha256, "".join(log) or str(exc)) from exc
    return compiled.fn


def forget(sha256: str) -> None:
    """Drop a cached object (its pins were removed: a later compile must recreate maps)."""
    compiled = _CACHE.pop(sha256, None)
    if compiled is not None:
        with contextlib.suppress(Exception):
            compiled.bpf.cleanup()
