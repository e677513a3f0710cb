"""Compile rendered programs, once per rendered-source hash per process.

Called by ``engine``. A compiled :class:`CompiledProgram` holds the bcc ``BPF``
object (whose tables are the node's pinned maps) and, once loaded, the
verified program fd. :func:`compile_count` counts clang runs so tests and the
bench can assert that a policy change compiles nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
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
    _release_compiler_heap()
    return compiled


_MADV_DONTNEED = 4
_COMPILER_LIBRARIES = ("libLLVM", "libclang-cpp", "libclang")


def _release_compiler_heap() -> None:
    """Give back what only the compiler needed, once a program is compiled.

    clang leaves tens of MB of freed heap behind (``malloc_trim``), and ~85 MB of
    LLVM/clang library pages it touched stay mapped although the agent runs no
    compiler until the datapath's feature set changes. Those pages are clean
    copies of the library files (no private or anonymous page in the mapping),
    so unmapping them from this process is safe: they stay in the page cache and
    fault back in if clang runs again.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, end in _clean_compiler_mappings():
        libc.madvise(start, end - start, _MADV_DONTNEED)


def release_freed_heap() -> None:
    """Return freed heap to the kernel (glibc ``malloc_trim``); cheap, safe any time."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _clean_compiler_mappings() -> list[tuple[int, int]]:
    """Read-only mappings of the compiler libraries holding no private or anonymous page."""
    try:
        with open("/proc/self/smaps") as smaps:
            text = smaps.read()
    except OSError:
        return []
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    dirty = 0
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if current is not None and dirty == 0:
                found.append(current)
            current, dirty = None, 0
            name = head[5] if len(head) >= 6 else ""
            if "w" not in head[1] and any(lib in name for lib in _COMPILER_LIBRARIES):
                lo, hi = head[0].split("-")
                current = (int(lo, 16), int(hi, 16))
        elif current is not None and head and head[0] in ("Private_Dirty:", "Anonymous:", "Swap:"):
            dirty += int(head[1])
    if current is not None and dirty == 0:
        found.append(current)
    return found


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
