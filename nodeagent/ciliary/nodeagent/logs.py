"""Structured logging for the agent: one ``key=value`` line per record.

Fields passed via ``extra={...}`` are appended after the message, so
``log.info("Registered node", extra={"node": n, "lease": id})`` prints
``... msg="Registered node" node=n lease=123``.
"""

from __future__ import annotations

import logging
import sys

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… msg=… <extras>`` (exceptions appended on following lines); ``ts`` to the
    millisecond, so an agent's lines line up with the operator's when timing a change end to end."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        line = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO") -> None:
    """Install the key=value formatter on the root logger (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(root.level, logging.INFO))  # its DEBUG is per-call noise
