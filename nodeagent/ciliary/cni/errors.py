"""Typed CNI errors and the one place they become the spec's error JSON.

Every failure the plugin reports to the runtime is a :class:`CniError` carrying a
code from :class:`ErrorCode`: the well-known codes of the CNI specification
(1-11) or Ciliary's own codes (100 and above). ``main`` prints
:meth:`CniError.to_result` on stdout and exits non-zero.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    """Error codes: 1-99 are reserved by the CNI specification, 100+ are ours."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    POD_CIDR_EXHAUSTED = 100
    AGENT_UNREACHABLE = 101
    AGENT_REJECTED = 102
    PLUMBING_FAILED = 103
    CHECK_FAILED = 104
    AGENT_NOT_ENFORCING = 105
    """The agent runs without its datapath (``--datapath off``) and refuses every endpoint."""
    INTERNAL = 199


class CniError(Exception):
    """A failure reported to the runtime as a CNI error result."""

    def __init__(self, code: ErrorCode | int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_result(self, cni_version: str) -> dict[str, Any]:
        """The error result the specification asks for (printed on stdout)."""
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}

    def __repr__(self) -> str:
        return f"CniError(code={self.code}, msg={self.msg!r}, details={self.details!r})"
