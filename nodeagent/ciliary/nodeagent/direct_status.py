"""Direct status mode: the agent patches ``.status.nodes.<its node>`` of each policy itself.

Used when the operator runs with ``--no-enable-k8s-event-handover`` (Cilium 1.7's
default write path; for comparison and small clusters: the number of status
writes grows with the number of nodes). The agent keeps writing its
PolicyReports into etcd as well (the operator computes the Enforced condition
from them); :class:`DirectStatusWriter` adds one merge patch on the status
subresource per report change. A change of ``lastUpdated`` alone is not a
change. Who calls it: the agent's reporting loop, right after it puts a report
(``write``) and after it deletes one (``remove``). Best effort: the etcd report
stays the source of truth, so a failed write is logged and tried again with the
next change. Imported by the agent only in direct mode (kubernetes_asyncio costs
~25 MB of the agent's memory otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from ciliary.operator.reports import PolicyReport, status_nodes_entry

log = logging.getLogger(__name__)
GROUP, VERSION = "cilium.io", "v2"
PLURALS = {"CiliumNetworkPolicy": "ciliumnetworkpolicies",
           "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies"}
MERGE_PATCH = "application/merge-patch+json"


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


class DirectStatusWriter:
    """Writes this node's entry of each policy's ``.status.nodes`` (merge patch), once per report change."""

    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.node = node
        self.written: dict[str, dict[str, Any]] = {}
        """policy uid -> the entry last written."""
        self.writes = 0
        self.failures = 0
        self.last_error = ""

    async def write(self, report: PolicyReport) -> bool:
        """Patch the entry for ``report`` unless it equals the last one written (lastUpdated aside).

        Returns True when a patch was sent. A policy that no longer exists is
        forgotten; a failed write is logged and returns False (tried again on the next change).
        """
        entry = status_nodes_entry(report)
        old = self.written.get(report.policy_uid)
        if old is not None and _comparable(old) == _comparable(entry):
            return False
        sent = await self._patch(report, _entry_patch(old, entry))
        if sent:
            self.written[report.policy_uid] = entry
        return sent

    async def remove(self, report: PolicyReport) -> bool:
        """Remove this node's entry (the node no longer enforces the policy)."""
        self.written.pop(report.policy_uid, None)
        return await self._patch(report, None)

    def forget(self, policy_uid: str) -> None:
        self.written.pop(policy_uid, None)

    async def _patch(self, report: PolicyReport, entry: dict[str, Any] | None) -> bool:
        body = {"status": {"nodes": {self.node: entry}}}
        plural = PLURALS[report.kind]
        try:
            if report.namespace:
                await self.custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
                    GROUP, VERSION, report.namespace, plural, report.name, body, _content_type=MERGE_PATCH)
            else:
                await self.custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]
                    GROUP, VERSION, plural, report.name, body, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                self._failed(report, f"{exc.status} {exc.reason}")
            self.forget(report.policy_uid)
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(report, repr(exc))
            self.forget(report.policy_uid)
            return False
        self.writes += 1
        return True

    def _failed(self, report: PolicyReport, error: str) -> None:
        self.failures += 1
        self.last_error = error
        log.warning("Direct status write failed", extra={"node": self.node, "policy": report.name,
                                                         "namespace": report.namespace, "error": error})
