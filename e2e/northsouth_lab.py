"""The north-south e2e tests' view of the lab: clients on the world host and each node's load balancer.

:func:`world` runs ``service_probe.PROBE`` in the world host's network namespace (no node's socket
programs act there, so an answer proves the translation on a node's device); :func:`services_doc`,
:func:`backends` and :func:`counters` read a node's ``GET /v1/services`` (frontends, backends, the
north-south programs' counters); :func:`wait_for` polls a check, bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from ciliary.lab import topology
from service_probe import PROBE


def world(lab: Any, kind: str, ip: str, port: int, count: int = 1, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Connections from the world host's namespace (no cgroup of any node: nothing translates at connect)."""
    out = subprocess.run(["nsenter", f"--net={topology.NETNS_DIR / lab.lab.layout.world_netns}", sys.executable,
                          "-c", PROBE, kind, ip, str(port), str(count), str(timeout)],
                         capture_output=True, text=True, timeout=60 + count * timeout)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def services_doc(lab: Any, node: str) -> dict[str, Any]:
    return dict(lab.agent_json(node, "/v1/services"))


def wait_for(check: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def backends(lab: Any, node: str, ip: str, port: int, proto: str = "TCP") -> list[str] | None:
    for fe in services_doc(lab, node)["frontends"]:
        if (fe["address"], fe["port"], fe["protocol"]) == (ip, port, proto):
            return sorted(f"{b['address']}:{b['port']}" for b in fe["backends"])
    return None


def counters(lab: Any, node: str) -> dict[str, int]:
    return dict(services_doc(lab, node)["north_south"]["counters"])
