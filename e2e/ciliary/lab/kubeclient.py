"""Event posting and timestamps for the lab's own processes (clients come from ``ciliary.operator.kube.kubeapi``)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

log = logging.getLogger(__name__)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")



async def post_event(
    core: client.CoreV1Api, *, obj: dict[str, Any], reason: str, message: str,
    component: str, host: str = "", type_: str = "Warning",
) -> None:
    """Post a core/v1 Event about ``obj`` ({kind, namespace, name, uid}); never raises."""
    namespace = obj.get("namespace") or "default"
    body: Any = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{obj['name']}.", "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": obj["kind"], "name": obj["name"],
                           "namespace": obj.get("namespace", ""), "uid": obj.get("uid", "")},
        "reason": reason, "message": message, "type": type_,
        "source": {"component": component, "host": host},
        "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        "reportingComponent": component, "reportingInstance": host or component,
    }
    try:
        await core.create_namespaced_event(namespace, body)
    except ApiException as exc:
        log.warning("could not post event %s for %s: %s", reason, obj.get("name"), exc.reason)
