"""Status handover: agents' PolicyReports in etcd -> each policy's ``.status`` (Cilium's k8s-event-handover).

Agents write one :class:`~ciliary.operator.status.reports.PolicyReport` per (policy,
node) at ``keyspace.report_key`` bound to their lease. :class:`StatusHandover`
mirrors two etcd prefixes with :class:`PrefixMirror` (a full list, then a watch
that resumes from the last revision after a reconnect and lists again after a
compaction):

- ``/ciliary/reports/v1/`` -> reports per policy uid and node;
- ``/ciliary/intents/v1/`` -> which nodes must enforce which policy (the
  ``policies`` of each published NodeIntent) and from which intent revision.

kopf's policy handlers feed it the policy objects (``observe_policy`` /
``forget_policy``; the status it compares against comes from there and from
its own write responses) and the ``Valid`` condition they computed
(``validated``), and what of a valid generation is not enforced as written
(``assessed``: such a policy reads ``Enforced=False``, ``PartiallyEnforced``):
the handover is the one writer of ``.status``, so a policy
edit costs one write for Valid and Enforced together. A generation the operator has resolved counts
as resolved only once the intent mirror has seen the etcd revision its intents were written at
(``intents_revision``): before that, which nodes must enforce it is not known here. Per policy it computes the desired status with the
pure ``enforcement`` module and sends the smallest merge patch to the status
subresource, at most once per ``interval`` per policy and only when something
other than ``lastUpdated`` changed; roll-out progress alone (more nodes caught
up, none in error, not all) waits up to ``progress_interval`` (default five
intervals), so a quick roll-out costs two writes: "not yet" and "done". With ``write_nodes=False`` (direct mode:
agents patch ``.status.nodes`` themselves) it writes only the ``Enforced``
condition and ``status.enforcement``.

Nothing is written before both prefixes were listed, the policies were listed
(``policies_listed``) and every event in ``wait_for`` is set: an operator
restart compares the full picture with what the objects show and writes nothing
unchanged. ``settled`` is set while nothing is pending and no write is in flight;
the first time after the start it is logged (``Status handover caught up``): the
signal a test waits for before it asserts that nothing (more) was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aiohttp
import grpc
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from ciliary.operator import operator_metrics
from ciliary.operator.kube import kubeapi
from ciliary.operator.status import enforcement, netpol_events
from ciliary.operator.status.enforcement import Expectation, PolicyView
from ciliary.operator.status.flush_schedule import FlushSchedule
from ciliary.operator.status.reports import PolicyReport, parse_policy_report
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdStore, EtcdUnavailableError

log = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 30
"""A status PATCH taking longer is given up and retried after the interval."""
STREAM_ERRORS: tuple[type[BaseException], ...] = (aetcd.ClientError, EtcdUnavailableError, grpc.aio.AioRpcError)


class PrefixMirror:
    """Keeps up with every key under one etcd prefix and reports puts and deletes to callbacks.

    ``synced`` is set after the first full list. A broken watch is re-created
    from the last seen revision + 1 (no event lost, none repeated); when etcd has
    compacted that revision away, the prefix is listed again and the difference
    with what was known is reported (vanished keys as deletes).
    """

    def __init__(self, store: EtcdStore, prefix: str, on_put: Callable[[str, bytes], None],
                 on_delete: Callable[[str], None], *, max_backoff: float = 5.0) -> None:
        self.store = store
        self.prefix = prefix
        self.on_put = on_put
        self.on_delete = on_delete
        self.max_backoff = max_backoff
        self.keys: dict[str, int] = {}
        """key -> mod revision of the value last reported."""
        self.revision = 0
        self.synced = asyncio.Event()
        self.events = 0
        self.lists = 0
        self.resumes = 0

    async def relist(self) -> None:
        rows = await self.store.get_prefix(self.prefix.encode())
        seen: dict[str, int] = {}
        for kv in rows:
            key = kv.key.decode()
            seen[key] = kv.mod_revision
            if self.keys.get(key) != kv.mod_revision:
                self.on_put(key, kv.value)
        for key in set(self.keys) - set(seen):
            self.on_delete(key)
        self.keys = seen
        self.revision = rows.header.revision
        self.lists += 1

    def apply(self, event: aetcd.rtypes.Event) -> None:
        key = event.kv.key.decode()
        self.events += 1
        self.revision = max(self.revision, event.kv.mod_revision)
        if event.kind == aetcd.rtypes.EventKind.DELETE:
            if self.keys.pop(key, None) is not None:
                self.on_delete(key)
        else:
            self.keys[key] = event.kv.mod_revision
            self.on_put(key, event.kv.value)

    async def run(self) -> None:
        need_list, delay = True, 0.2
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                    self.synced.set()
                watch = await self.store.client.watch_prefix(self.prefix.encode(), start_revision=self.revision + 1)
                try:
                    delay = 0.2
                    async for event in watch:
                        self.apply(event)
                finally:
                    with contextlib.suppress(*STREAM_ERRORS, TimeoutError):
                        await asyncio.wait_for(watch.cancel(), 2.0)
                self.resumes += 1
            except aetcd.RevisionCompactedError as exc:
                log.info("Watch of %s fell behind a compaction (%s); listing again", self.prefix, exc)
                need_list = True
            except STREAM_ERRORS as exc:
                log.warning("Watch of %s broke (%s); resuming from revision %d in %.1f s",
                            self.prefix, exc, self.revision + 1, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                self.resumes += 1


@dataclass
class HandoverStats:
    writes: int = 0
    held: int = 0
    """Flushes that held roll-out progress back (written later with the rest)."""
    skipped: int = 0
    """Flushes that found nothing worth writing."""
    failures: int = 0


def _newer_or_same(new: str, old: str) -> bool:
    """resourceVersions are opaque, but etcd-backed ones are integers: drop events older than what we hold."""
    if new.isdigit() and old.isdigit():
        return int(new) >= int(old)
    return True


class StatusHandover:
    """Aggregates reports per policy and writes ``.status`` (see the module docstring)."""

    def __init__(self, store: EtcdStore, api: client.ApiClient, *, interval: float = 1.0,
                 write_nodes: bool = True, node_names: Callable[[], Collection[str]] | None = None,
                 resolved_generation: Callable[[str], int | None] | None = None,
                 wait_for: Sequence[asyncio.Event] = (), concurrency: int = 8,
                 progress_interval: float | None = None, clock: Callable[[], float] = time.monotonic,
                 require_assessment: bool = False, intents_revision: Callable[[], int] | None = None) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.interval = interval
        self.progress_interval = 5 * interval if progress_interval is None else progress_interval
        self.write_nodes = write_nodes
        self.node_names = node_names
        self.resolved_generation = resolved_generation
        self.intents_revision = intents_revision
        """The etcd revision by which the intents of the resolution ``resolved_generation`` describes were
        written: until the intent mirror has seen it, the resolved generation counts as not resolved yet (the
        nodes that must enforce it are not known here: read as "none", that would be ``NoEndpoints``)."""
        self._lagging: set[str] = set()
        """Policies flushed while the intent mirror was behind ``intents_revision`` (marked again once it is not)."""
        self.wait_for = tuple(wait_for)
        self.clock = clock
        self.schedule = FlushSchedule(interval)
        self.policies: dict[str, PolicyView] = {}
        self.reports: dict[str, dict[str, PolicyReport]] = {}
        self.expected: dict[str, dict[str, Expectation]] = {}
        self.valid: dict[str, dict[str, Any]] = {}
        """policy uid -> the Valid condition of its latest generation (from the policy handlers)."""
        self.unenforced: dict[str, tuple[int, str]] = {}
        """policy uid -> (generation, what of it is not enforced as written; "" nothing), from the handlers."""
        self.tls: dict[str, str] = {}
        """policy uid -> why its TLS interception is not enforced (a Secret or item missing; the reconciler)."""
        self.require_assessment = require_assessment
        """True (the operator): no Enforced=True for a generation the handlers have not assessed."""
        self.node_policies: dict[str, dict[str, int]] = {}
        """node -> {policy uid: generation} of its published intent."""
        self.policies_listed = asyncio.Event()
        self.started = asyncio.Event()
        self.settled = asyncio.Event()
        """Set while nothing is pending and no write is in flight; the first time is logged (``caught up``)."""
        self._caught_up = False
        self.stats = HandoverStats()
        self._present: frozenset[str] | None = None
        self._nodes_checked = float("-inf")
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self.report_mirror = PrefixMirror(store, keyspace.REPORTS_PREFIX, self._report_put, self._report_deleted)
        self.intent_mirror = PrefixMirror(store, keyspace.INTENTS_PREFIX, self._intent_put, self._intent_deleted)

    def metrics_view(self) -> operator_metrics.HandoverView:
        """What the operator's Prometheus metrics read of this handover (at scrape time)."""
        return operator_metrics.HandoverView(
            writes=lambda: self.stats.writes, failures=lambda: self.stats.failures,
            pending=lambda: self.schedule.pending,
            policies=lambda: [(view.kind, operator_metrics.validity(self.valid.get(uid)))
                              for uid, view in self.policies.items()])

    # ------------------------------------------------------------ inputs

    def observe_policy(self, body: Mapping[str, Any]) -> None:
        """A policy object as kopf (or a write response) saw it."""
        view = PolicyView.from_body(body)
        if not view.uid or (view.kind not in kubeapi.POLICY_PLURALS and view.kind != kubeapi.NETPOL_KIND):
            return
        log.debug("Observed %s generation %d rv %s", view.where(), view.generation, view.resource_version)
        held = self.policies.get(view.uid)
        if held is not None and not _newer_or_same(view.resource_version, held.resource_version):
            return
        if view.kind == kubeapi.NETPOL_KIND:  # no status on the object: what was said lives here
            view = dataclasses.replace(view, status=held.status if held is not None else {})
        self.policies[view.uid] = view
        self._mark(view.uid)

    def validated(self, uid: str, condition: Mapping[str, Any]) -> None:
        """The ``Valid`` condition for the policy's generation named in it (written with the next flush)."""
        wanted = dict(condition)
        if self.valid.get(uid) != wanted:
            self.valid[uid] = wanted
            self._mark(uid)

    def assessed(self, uid: str, generation: int, unenforced: str) -> None:
        """What of ``generation`` is not enforced exactly as written ("" nothing; ``policy.support``)."""
        if self.unenforced.get(uid) != (generation, unenforced):
            self.unenforced[uid] = (generation, unenforced)
            self._mark(uid)

    def tls_problems(self, problems: Mapping[str, str]) -> None:
        """The TLS problems of every policy now (policy uid -> message); a policy absent has none."""
        for uid in set(self.tls) | set(problems):
            if self.tls.get(uid) != problems.get(uid):
                self._mark(uid)
        self.tls = dict(problems)

    def forget_policy(self, uid: str) -> None:
        self.policies.pop(uid, None)
        self.valid.pop(uid, None)
        self.unenforced.pop(uid, None)
        self.schedule.forget(uid)

    def _mark(self, uid: str) -> None:
        if uid in self.policies:
            self.settled.clear()
            if self.schedule.mark(uid, self.clock()):
                self._wake.set()

    def _report_put(self, key: str, value: bytes) -> None:
        try:
            uid, node = keyspace.report_from_key(key)
            report = parse_policy_report(value)
        except ValueError as exc:
            log.warning("Ignored malformed report %s: %s", key, exc)
            self._report_deleted(key)
            return
        per_node = self.reports.setdefault(uid, {})
        if per_node.get(node) != report:
            per_node[node] = report
            self._mark(uid)

    def _report_deleted(self, key: str) -> None:
        try:
            uid, node = keyspace.report_from_key(key)
        except ValueError:
            return
        per_node = self.reports.get(uid)
        if per_node is not None and per_node.pop(node, None) is not None:
            if not per_node:
                del self.reports[uid]
            self._mark(uid)

    def _intent_put(self, key: str, value: bytes) -> None:
        node = keyspace.node_from_key(keyspace.INTENTS_PREFIX, key)
        try:
            data = json.loads(value)
            revision = int(data["revision"])
            refs = {str(p["uid"]): int(p.get("generation") or 0) for p in data.get("policies") or ()}
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("Ignored malformed intent of %s: %s", node, exc)
            refs, revision = {}, 0
        self._set_intent(node, refs, revision)
        if self._lagging:
            self._wake.set()  # _mark_caught_up may have work now

    def _intent_deleted(self, key: str) -> None:
        self._set_intent(keyspace.node_from_key(keyspace.INTENTS_PREFIX, key), {}, 0)
        if self._lagging:
            self._wake.set()  # _mark_caught_up may have work now

    def _set_intent(self, node: str, refs: dict[str, int], revision: int) -> None:
        before = self.node_policies.get(node, {})
        # At start-up the revision from which a node had to enforce a policy is unknown: 0 (generation check only)
        learning = self.intent_mirror.synced.is_set()
        for uid in set(before) | set(refs):
            per_node = self.expected.setdefault(uid, {})
            if uid not in refs:
                per_node.pop(node, None)
                if not per_node:
                    del self.expected[uid]
            elif before.get(uid) != refs[uid] or node not in per_node:
                per_node[node] = Expectation(refs[uid], revision if learning else 0)
            else:
                continue
            self._mark(uid)
        if refs:
            self.node_policies[node] = refs
        else:
            self.node_policies.pop(node, None)

    def _refresh_nodes(self, *, force: bool = False) -> None:
        if self.node_names is None:
            return
        now = self.clock()
        if not force and now - self._nodes_checked < min(self.interval, 0.5):
            return
        self._nodes_checked = now
        present = frozenset(self.node_names())
        if present == self._present:
            return
        changed = present ^ (self._present or frozenset())
        self._present = present
        for uid in {*self.reports, *self.expected}:
            if changed & (self.reports.get(uid, {}).keys() | self.expected.get(uid, {}).keys()):
                self._mark(uid)

    # ------------------------------------------------------------ output

    def desired(self, uid: str) -> enforcement.DesiredStatus:
        view = self.policies[uid]
        resolved = self.resolved_generation(uid) if self.resolved_generation else None
        if resolved is not None and self._intents_behind():
            resolved = None
            self._lagging.add(uid)
        generation, gaps = self.unenforced.get(uid, (None, ""))
        unenforced: str | None = gaps if generation == view.generation else \
            (None if self.require_assessment else "")
        if unenforced is not None and self.tls.get(uid):
            unenforced = "; ".join(part for part in (self.tls[uid], unenforced) if part)
        return enforcement.desired_status(
            view, self.expected.get(uid, {}), self.reports.get(uid, {}), present=self._present,
            write_nodes=self.write_nodes, resolved_generation=resolved,
            resolution_known=self.resolved_generation is not None, valid=self.valid.get(uid),
            unenforced=unenforced)

    def _intents_behind(self) -> bool:
        return self.intents_revision is not None and self.intent_mirror.revision < self.intents_revision()

    def _mark_caught_up(self) -> None:
        """Mark again the policies flushed while the intent mirror lagged, once it has caught up."""
        if self._lagging and not self._intents_behind():
            lagging, self._lagging = self._lagging, set()
            for uid in lagging:
                self._mark(uid)

    async def flush(self, uids: Sequence[str]) -> None:
        writes = []
        for uid in uids:
            view = self.policies.get(uid)
            desired = self.desired(uid) if view else None
            patch = enforcement.status_patch(view, desired) if view and desired else None
            if view is None or desired is None or patch is None:
                self.schedule.clean(uid)
                self.stats.skipped += 1
                continue
            last = self.schedule.last_write(uid)
            if last is not None and self.clock() < last + self.progress_interval and \
                    enforcement.holds_progress(view, desired):
                self.schedule.defer(uid, last + self.progress_interval, self.clock())
                self.stats.held += 1
                continue
            self.schedule.wrote(uid, self.clock())
            writes.append(self._write(view, patch))
        if writes:
            await asyncio.gather(*writes)

    async def _write(self, view: PolicyView, patch: dict[str, Any]) -> None:
        if view.kind == kubeapi.NETPOL_KIND:
            await self._say(view, patch)
            return
        async with self._limit:
            try:
                body = await kubeapi.patch_policy_status(self.custom, view.kind, view.namespace, view.name, patch,
                                                         timeout=WRITE_TIMEOUT_S)
                self.stats.writes += 1
            except ApiException as exc:
                self._write_failed(view, exc.status, str(exc.reason))
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._write_failed(view, None, repr(exc))
                return
        if view.uid not in self.policies:
            return  # deleted while the write was in flight: do not bring it back
        body.setdefault("kind", view.kind)
        self.observe_policy(body)
        log.debug("Wrote status of %s %s", view.kind, view.where())

    async def _say(self, view: PolicyView, patch: dict[str, Any]) -> None:
        """A NetworkPolicy: an Event when its enforcement changed; the new status is held here only."""
        said = netpol_events.enforcement_event(view, self.desired(view.uid))
        if said is not None:
            body = netpol_events.event_body(view, kubeapi.NETPOL_KIND, f"{kubeapi.NETPOL_GROUP}/"
                                            f"{kubeapi.NETPOL_VERSION}", *said)
            async with self._limit:
                try:
                    await netpol_events.post_event(self.core, body, timeout=WRITE_TIMEOUT_S)
                    self.stats.writes += 1
                except ApiException as exc:
                    self._write_failed(view, None, f"{exc.status} {exc.reason}")
                    return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self._write_failed(view, None, repr(exc))
                    return
        if view.uid in self.policies:
            status = enforcement.apply_merge_patch(view.status, patch["status"])
            self.policies[view.uid] = dataclasses.replace(self.policies[view.uid], status=status)

    def _write_failed(self, view: PolicyView, status: int | None, reason: str) -> None:
        """404: the policy is gone. Anything else (an HTTP error, a timeout, a lost connection): written
        again after the interval (the change stays marked)."""
        if status == 404:
            self.forget_policy(view.uid)
            return
        self.stats.failures += 1
        log.warning("Status write of %s %s failed: %s %s", view.kind, view.where(), status or "", reason)
        self._mark(view.uid)

    # ------------------------------------------------------------ loop

    async def run(self) -> None:
        mirrors = [asyncio.create_task(self.report_mirror.run(), name="handover-reports"),
                   asyncio.create_task(self.intent_mirror.run(), name="handover-intents")]
        try:
            ready = [self.report_mirror.synced, self.intent_mirror.synced, self.policies_listed, *self.wait_for]
            waiting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in ready)))
            done, _ = await asyncio.wait([waiting, *mirrors], return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                for task in mirrors:
                    task.result()
            self._refresh_nodes(force=True)
            for uid in self.policies:
                self._mark(uid)
            self.started.set()
            log.info("Status handover started (interval %.1f s, node entries %s)", self.interval,
                     "written by the operator" if self.write_nodes else "written by the agents")
            while True:
                for task in mirrors:
                    if task.done():
                        task.result()
                self._wake.clear()
                self._refresh_nodes()
                self._mark_caught_up()
                due = self.schedule.due(self.clock())
                if due:
                    await self.flush(due)
                    continue
                if self.schedule.pending == 0:
                    self.settled.set()
                    if not self._caught_up:
                        self._caught_up = True
                        log.info("Status handover caught up: %d policies checked, %d status writes",
                                 len(self.policies), self.stats.writes)
                deadline = self.schedule.next_deadline()
                timeout = self.interval if deadline is None else min(self.interval, deadline - self.clock())
                if self.node_names is not None:
                    timeout = min(timeout, 0.5)
                if timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for task in mirrors:
                task.cancel()
            await asyncio.gather(*mirrors, return_exceptions=True)
