"""TLS interception and header-Secret problems of policies: into their status (the handover) and one Warning
Event each.

Owns :class:`TlsProblemReporter`, the reconciler's ``report_tls``: it hands the current
problems (policy uid -> message naming the Secret, from ``policy.tls_secrets``) to the status
handover, whose ``Enforced`` condition then says them (``Enforced=False``), and posts one Warning
Event ``TLSSecretProblem`` (``HeaderSecretProblem`` when all are about ``policy.header_secrets``)
per policy and distinct message (again after the problem went away and came back). Messages
name Secrets and items, never their content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ciliary.operator.kube import kubeapi
from ciliary.operator.policy import header_secrets
from ciliary.operator.status import netpol_events
from ciliary.operator.status.handover import StatusHandover

log = logging.getLogger(__name__)

REASON = "TLSSecretProblem"
HEADER_REASON = "HeaderSecretProblem"
CLUSTER_EVENTS_NAMESPACE = "default"
"""Where Events of a cluster-scoped policy go (as kopf posts them)."""


def event_of(message: str) -> tuple[str, str]:
    """(reason, text) of the Event for one policy's problems: ``HeaderSecretProblem`` when they are all about
    header values from Secrets (``policy.header_secrets``), else ``TLSSecretProblem``."""
    parts = message.split("; ")
    if all(part.startswith(header_secrets.PREFIX) for part in parts):
        return HEADER_REASON, f"headerMatches not enforced as written: {message}"
    return REASON, f"TLS interception not enforced: {message}"


class TlsProblemReporter:
    """Status and Events for TLS problems (call it with every pass's problems)."""

    def __init__(self, handover: StatusHandover, api: client.ApiClient) -> None:
        self.handover = handover
        self.core = client.CoreV1Api(api)
        self.said: set[tuple[str, str]] = set()

    async def __call__(self, problems: Mapping[str, str]) -> None:
        self.handover.tls_problems(problems)
        self.said &= set(problems.items())
        for uid, message in sorted(problems.items()):
            view = self.handover.policies.get(uid)
            if view is None or (uid, message) in self.said:
                continue
            reason, text = event_of(message)
            body = netpol_events.event_body(view, view.kind, f"{kubeapi.GROUP}/{kubeapi.VERSION}", "Warning",
                                            reason, text[: netpol_events.MAX_MESSAGE])
            if not body["metadata"]["namespace"]:
                body["metadata"]["namespace"] = CLUSTER_EVENTS_NAMESPACE
            try:
                await netpol_events.post_event(self.core, body, timeout=5.0)
            except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("Event %s on %s not posted: %s", reason, view.where(), type(exc).__name__)
                continue
            self.said.add((uid, message))
            log.warning("%s of %s: %s", reason, view.where(), message)
