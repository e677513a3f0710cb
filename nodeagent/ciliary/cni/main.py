"""``ciliary-cni``: the CNI entry point — read env and stdin, dispatch, print JSON.

The runtime (kubelet's container runtime, e.g. containerd) runs this
executable in the node's network namespace with ``CNI_COMMAND`` and friends set
(see ``invocation``) and the network configuration on stdin (see ``config``).
Success: the result (ADD) or version info (VERSION) on stdout, exit 0; DEL and CHECK
print nothing. Failure: ``{"cniVersion", "code", "msg", "details"}`` on stdout and
exit 1. Diagnostics go to stderr as ``key=value`` lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from ciliary.cni import commands, config, errors, invocation

log = logging.getLogger("ciliary.cni")


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One invocation: (exit code, JSON document to print or None)."""
    version = config.DEFAULT_VERSION
    try:
        inv = invocation.read_invocation(environ)
        if inv.command == "VERSION":
            document = config.load_json(stdin) if stdin.strip() else {}
            return 0, {
                "cniVersion": config.requested_version(document),
                "supportedVersions": list(config.SUPPORTED_VERSIONS),
            }
        version = config.requested_version(config.load_json(stdin))
        conf = config.parse_network_config(stdin)
        if inv.command == "ADD":
            return 0, commands.cmd_add(inv, conf)
        if inv.command == "DEL":
            commands.cmd_del(inv, conf)
        else:
            commands.cmd_check(inv, conf)
        return 0, None
    except errors.CniError as exc:
        log.error("CNI call failed code=%s msg=%s details=%s", exc.code, exc.msg, exc.details)
        return 1, exc.to_result(version)
    except Exception as exc:  # the process boundary: the runtime must get error JSON
        log.exception("CNI call crashed")
        err = errors.CniError(errors.ErrorCode.INTERNAL, "Internal error in ciliary-cni", f"{type(exc).__name__}: {exc}")
        return 1, err.to_result(version)


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("CILIARY_CNI_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s pid=%(process)d msg=%(message)s",
    )
    document: dict[str, Any] | None
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        err = errors.CniError(errors.ErrorCode.IO_FAILURE, "Failed to read the network configuration", str(exc))
        code, document = 1, err.to_result(config.DEFAULT_VERSION)
    else:
        code, document = run(os.environ, stdin)
    if document is not None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
