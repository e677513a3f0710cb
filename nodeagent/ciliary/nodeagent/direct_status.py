"""Direct status mode: the agent patches ``.status.nodes.<its node>`` of each policy itself.

Used when the operator runs with ``--no-enable-k8s-event-handover`` (Cilium 1.7's
default write path; for comparison and small clusters: the number of status
writes grows with the number of nodes). The agent keeps writing its
PolicyReports into etcd as well (the operator computes the Enforced condition
from them); :class:`DirectStatusWriter` adds one merge patch on the status
subresource per report change. A change of ``lastUpdated`` alone is not a
change. Who calls it: the agent's reporting loop, right after it puts a report
(``write``) and after it deletes one (``remove``), and on every tick
(``retry``). Best effort: the etcd report stays the source of truth; a failed
write (many agents patching one object at once can make the apiserver answer
504) is logged and tried again, with a backoff from 1 s to 30 s, until it lands
or a newer change replaces it. Imported by the agent only in direct mode (kubernetes_asyncio costs
~25 MB of the agent's memory otherwise).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from ciliary.operator.kube import kubeapi
from ciliary.operator.status.reports import PolicyReport, status_nodes_entry

log = logging.getLogger(__name__)
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
WRITE_TIMEOUT_S = 10
"""A status PATCH taking longer is given up (and retried): it must not stall the reporting loop."""


def _entry_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch from the entry we last wrote to ``new`` (dropped keys become null)."""
    patch: dict[str, Any] = dict(new)
    if old is None:
        return patch
    for key in old:
        if key not in new:
            patch[key] = None
    old_ann, new_ann = old.get("annotations") or {}, new.get("annotations") or {}
    if "annotations" in new and old_ann:
        patch["annotations"] = {**{k: None for k in old_ann if k not in new_ann}, **new_ann}
    return patch


def _comparable(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "lastUpdated"}


def _name(report: PolicyReport) -> tuple[str, str, str]:
    return report.kind, report.namespace, report.name


class DirectStatusWriter:
    """Writes this node's entry of each policy's ``.status.nodes`` (merge patch), once per report change."""

    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.node = node
        self.written: dict[str, dict[str, Any]] = {}
        """policy uid -> the entry last written."""
        self.holder: dict[tuple[str, str, str], str] = {}
        """(kind, namespace, name) -> uid of the policy whose entry this writer last wrote under that name."""
        self.writes = 0
        self.failures = 0
        self.last_error = ""
        self.pending: dict[str, tuple[PolicyReport, bool]] = {}
        """policy uid -> (report, is_removal) whose write failed, to be retried."""
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S

    async def write(self, report: PolicyReport) -> bool:
        """Patch the entry for ``report`` unless it equals the last one written (lastUpdated aside).

        Returns True when a patch was sent. A policy that no longer exists is
        forgotten; a failed write is logged, returns False and is retried (``retry``).
        """
        self._settled(report.policy_uid)
        entry = status_nodes_entry(report)
        old = self.written.get(report.policy_uid)
        if old is not None and _comparable(old) == _comparable(entry):
            return False
        sent = await self._patch(report, _entry_patch(old, entry))
        if sent:
            self.written[report.policy_uid] = entry
            self.holder[_name(report)] = report.policy_uid
        return sent

    async def remove(self, report: PolicyReport) -> bool:
        """Remove this node's entry (the node no longer enforces the policy).

        Patches go by name, so once a policy deleted and created again under its name (a new uid) has this
        node's entry, removing the old one's would wipe the new one's: that removal is not sent (the old
        object is gone with its status)."""
        self._settled(report.policy_uid)
        self.written.pop(report.policy_uid, None)
        holder = self.holder.get(_name(report))
        if holder is not None and holder != report.policy_uid:
            return True
        self.holder.pop(_name(report), None)
        return await self._patch(report, None)

    def _settled(self, uid: str) -> None:
        """A newer change replaces the pending one; the backoff starts over once nothing is pending."""
        self.pending.pop(uid, None)
        if not self.pending:
            self._backoff = RETRY_MIN_S

    async def retry(self, now: float | None = None) -> int:
        """Send the failed writes again once their backoff has passed; returns how many landed."""
        now = time.monotonic() if now is None else now
        if not self.pending or now < self._retry_at:
            return 0
        landed = 0
        for report, removal in list(self.pending.values()):
            if await (self.remove(report) if removal else self.write(report)):
                landed += 1
        if self.pending:
            self._backoff = min(self._backoff * 2, RETRY_MAX_S)
            self._retry_at = now + self._backoff
        else:
            self._backoff = RETRY_MIN_S
        return landed

    def forget(self, policy_uid: str) -> None:
        self.written.pop(policy_uid, None)

    async def _patch(self, report: PolicyReport, entry: dict[str, Any] | None) -> bool:
        if report.kind not in kubeapi.POLICY_PLURALS:
            return True  # a Kubernetes NetworkPolicy has no status to write: the operator's Events say it
        body = {"status": {"nodes": {self.node: entry}}}
        try:
            await kubeapi.patch_policy_status(self.custom, report.kind, report.namespace, report.name, body,
                                              timeout=WRITE_TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:
                self._failed(report, entry is None, f"{exc.status} {exc.reason}")
            self.forget(report.policy_uid)
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(report, entry is None, repr(exc))
            self.forget(report.policy_uid)
            return False
        self.writes += 1
        return True

    def _failed(self, report: PolicyReport, removal: bool, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self.pending[report.policy_uid] = (report, removal)
        if len(self.pending) == 1:
            self._retry_at = time.monotonic() + self._backoff
        log.warning("Direct status write failed", extra={"node": self.node, "policy": report.name,
                                                         "namespace": report.namespace, "error": error})
