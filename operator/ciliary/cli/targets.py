"""Where the CLI finds etcd and the node agents: flags, then environment, then the local lab."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ciliary.cli.errors import UserError


def lab_config() -> dict[str, object]:
    state = Path(os.environ.get("CILIARY_LAB_DIR", Path.cwd() / ".lab"))
    try:
        data = json.loads((state / "lab.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def etcd_endpoint(flag: str | None) -> str:
    """``--etcd-endpoints``, else CILIARY_ETCD_ENDPOINTS, else ETCDCTL_ENDPOINTS, else the lab's etcd."""
    for value in (flag, os.environ.get("CILIARY_ETCD_ENDPOINTS"), os.environ.get("ETCDCTL_ENDPOINTS")):
        if value:
            return value.split(",")[0]
    ports = lab_config().get("ports")
    if isinstance(ports, dict) and ports.get("etcd_client"):
        return f"http://127.0.0.1:{ports['etcd_client']}"
    raise UserError("no etcd to talk to: pass --etcd-endpoints, set CILIARY_ETCD_ENDPOINTS, "
                    "or start the lab (`ciliary lab up`)")
