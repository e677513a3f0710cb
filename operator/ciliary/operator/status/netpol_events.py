"""A Kubernetes NetworkPolicy's enforcement, reported as Events (it has no status Ciliary may write).

The status handover computes the same desired status for a NetworkPolicy as for
a CNP (``enforcement.desired_status``: ``Enforced`` from the agents' per-node
reports, ``N/M nodes``, ``Valid``) and, where it would patch a CNP's status,
calls :func:`enforcement_event` to turn the change into one Event on the
NetworkPolicy, and :func:`post_event` to create it (core/v1 Events, the verb
kopf already uses). The held status is the operator's memory only; a restarted
operator says it once more.

Event reasons: ``PolicyEnforced`` (Normal: enforced on every node hosting a
selected pod, or none selected), ``PolicyRollingOut`` (Normal: nodes still
catching up, none failing), ``PolicyNotEnforced`` (Warning: a node failed, the
policy is invalid, or it is only partly enforced; the message says which).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client

from ciliary.operator.status.enforcement import DesiredStatus, PolicyView

COMPONENT = "ciliary-operator"
MAX_MESSAGE = 1024


def enforcement_event(view: PolicyView, desired: DesiredStatus) -> tuple[str, str, str] | None:
    """(type, reason, message) saying the desired Enforced condition, or None if it equals the held one."""
    held = next((c for c in view.status.get("conditions") or () if c.get("type") == "Enforced"), None)
    wanted = desired.enforced
    same = held is not None and all(held.get(k) == wanted.get(k) for k in ("status", "reason", "message"))
    if same and view.status.get("enforcement") == desired.enforcement:
        return None
    message = f"{desired.enforcement}: {wanted.get('message', '')}"
    if wanted.get("status") == "True":
        return "Normal", "PolicyEnforced", message[:MAX_MESSAGE]
    if desired.catching_up or wanted.get("reason") == "Pending":
        return "Normal", "PolicyRollingOut", message[:MAX_MESSAGE]
    return "Warning", "PolicyNotEnforced", f"{wanted.get('reason')}: {message}"[:MAX_MESSAGE]


def event_body(view: PolicyView, kind: str, api_version: str, type_: str, reason: str,
               message: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{view.name}.", "namespace": view.namespace},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "name": view.name,
                           "namespace": view.namespace, "uid": view.uid},
        "type": type_, "reason": reason, "message": message,
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


async def post_event(core: client.CoreV1Api, body: Mapping[str, Any], *, timeout: float) -> None:
    await core.create_namespaced_event(body["metadata"]["namespace"], dict(body),  # type: ignore[arg-type]
                                       _request_timeout=timeout)
