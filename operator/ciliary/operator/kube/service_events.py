"""Warning Events on Services whose load balancing has a problem (``services.errors``).

One Event per (Service uid, reason, message) for the life of the process: a problem that persists
across reconcile passes is reported once, a changed message again.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from ciliary.operator.services.errors import ServiceProblem

log = logging.getLogger(__name__)


class ServiceEventPoster:
    def __init__(self, api: client.ApiClient, *, component: str = "ciliary-operator") -> None:
        self.core = client.CoreV1Api(api)
        self.component = component
        self.posted: set[tuple[str, str, str]] = set()

    async def post(self, problems: Mapping[str, Iterable[ServiceProblem]],
                   bodies: Mapping[str, Mapping[str, Any]]) -> int:
        """Post what is new; returns the number of Events created."""
        created = 0
        for key, items in problems.items():
            meta = (bodies.get(key) or {}).get("metadata", {}) or {}
            uid = str(meta.get("uid") or "")
            for problem in items:
                mark = (uid, problem.reason, problem.message)
                if mark in self.posted:
                    continue
                self.posted.add(mark)
                log.warning("Service load balancing problem: %s", problem,
                            extra={"service": key, "reason": problem.reason})
                try:
                    await self.core.create_namespaced_event(problem.namespace, self._event(problem, meta))  # type: ignore[arg-type]
                    created += 1
                except ApiException as exc:
                    log.warning("could not post the Event for %s: %s", key, exc.reason)
        return created

    def _event(self, problem: ServiceProblem, meta: Mapping[str, Any]) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{problem.name}.{secrets.token_hex(8)}", "namespace": problem.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": problem.namespace,
                               "name": problem.name, "uid": meta.get("uid", ""),
                               "resourceVersion": meta.get("resourceVersion", "")},
            "reason": problem.reason, "message": problem.message, "type": "Warning",
            "source": {"component": self.component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
