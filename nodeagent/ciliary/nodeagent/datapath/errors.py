"""Typed datapath failures, each carrying what it concerns.

Raised by ``compiling``, ``maps`` and ``loading``; ``engine.Datapath.apply``
lets them through after making sure the last good state keeps enforcing.
"""

from __future__ import annotations


class DatapathError(Exception):
    """Base of every datapath failure."""


class CompileFailed(DatapathError):
    """clang rejected a rendered program (a template bug, never a policy)."""

    def __init__(self, hook: str, sha256: str, message: str) -> None:
        super().__init__(f"program {hook} ({sha256[:12]}) did not compile: {message}")
        self.hook = hook
        self.sha256 = sha256
        self.message = message


class VerifierRejected(DatapathError):
    """The kernel verifier refused a compiled program; ``log`` is its output."""

    def __init__(self, hook: str, sha256: str, log: str) -> None:
        tail = log.strip().splitlines()[-3:] if log.strip() else ["(no verifier log)"]
        super().__init__(f"program {hook} ({sha256[:12]}) rejected by the verifier: {' | '.join(tail)}")
        self.hook = hook
        self.sha256 = sha256
        self.log = log


class PinFailed(DatapathError):
    """A verified program could not be pinned in bpffs (bpffs not mounted, no space, permissions)."""

    def __init__(self, hook: str, sha256: str, errno: int, message: str) -> None:
        super().__init__(f"program {hook} ({sha256[:12]}) could not be pinned (errno {errno}): {message}")
        self.hook = hook
        self.sha256 = sha256
        self.errno = errno


class MapFull(DatapathError):
    """A map would exceed its size; nothing of the apply was written."""

    def __init__(self, map_name: str, wanted: int, capacity: int) -> None:
        super().__init__(f"map {map_name} needs {wanted} entries but holds at most {capacity}")
        self.map_name = map_name
        self.wanted = wanted
        self.capacity = capacity


class MapWriteFailed(DatapathError):
    """A map write failed unexpectedly; the writes of this apply were undone."""

    def __init__(self, map_name: str, key: object, errno: int, message: str) -> None:
        super().__init__(f"map {map_name}: writing {key!r} failed: {message} (errno {errno})")
        self.map_name = map_name
        self.key = key
        self.errno = errno


class AttachFailed(DatapathError):
    """Attaching or detaching a program on a veth failed (others were still applied)."""

    def __init__(self, ifname: str, hook: str, message: str,
                 others: tuple[AttachFailed, ...] = ()) -> None:
        more = f" (and {len(others)} more)" if others else ""
        super().__init__(f"attaching {hook} on {ifname} failed: {message}{more}")
        self.ifname = ifname
        self.hook = hook
        self.message = message
        self.others = others
