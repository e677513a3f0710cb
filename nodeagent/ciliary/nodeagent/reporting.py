"""Reports back to the operator: one ``NodeStatusReport`` and one ``PolicyReport`` per policy.

The pure part, :func:`desired_reports`, turns an ``enforcing.Outcome`` into the
reports that should exist (etcd key -> report); :func:`changed` compares two
reports ignoring ``lastUpdated``. :class:`Reporter` is the async shell: after
every outcome change (and on a short tick) it writes what differs from what it
last wrote, bound to the agent's lease, and deletes reports of policies that
left the intent. When the lease changes (etcd lost it, the agent restarted),
it reads this node's reports from etcd and rewrites all of them under the new
lease, deleting the stale ones a previous agent process left.

Policy report semantics (Cilium's ``.status.nodes.<node>``):
- a policy counts as enforcing only when every local pod it selects (an intent
  endpoint listing the policy, with a veth in the registry) is in the kernel's
  endpoint map stamped with the applied revision, as read back from the kernel
  (``enforcing.Outcome.kernel_endpoints``); otherwise enforcing=false and the
  error names the pods that are missing;
- applied without error: ok=true, enforcing=true, generation and
  localPolicyRevision of the applied intent;
- a policy with entries that need a node-local proxy (``rules.dns``, ``toFQDNs``:
  the DNS proxy; ingress HTTP rules: the node's Envoy, ``proxy(applied)``; any other
  L7 rules: a proxy of their kind) is enforcing only while that proxy can enforce
  (``Outcome.proxy_problems``, plus ``"http"``: Envoy's problem for the intent in
  force); a kind the node has no proxy for (its traffic is dropped) is a problem
  too; otherwise enforcing=false with the proxy's problem;
- the newest intent failed to apply (or could not be parsed): ok=false,
  error=the typed error's message, enforcing=whether the state still in force
  enforces the policy (then with the generation in force).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Set
from typing import Any

import aetcd

from ciliary.nodeagent import enforcing, envoy_config, planning
from ciliary.operator import intents
from ciliary.operator.status import reports
from ciliary.operator.store import keyspace

log = logging.getLogger(__name__)

Report = reports.PolicyReport | reports.NodeStatusReport
ETCD_ERRORS: tuple[type[BaseException], ...] = (aetcd.ClientError, OSError, TimeoutError)
TICK_S = 1.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_reports(node: str, outcome: enforcing.Outcome, *, now: str,
                    proxy: Callable[[intents.NodeIntent], str] | None = None,
                    egress_proxies: Set[str] | None = None) -> dict[str, Report]:
    """Every report this node should have in etcd right now, by key.

    ``proxy(intent)``: why the node's L7 proxy does not enforce the HTTP rules of ``intent``
    ("" when it does); None: no proxy on this node (a policy with HTTP rules is not enforcing).
    ``egress_proxies``: the proxy kinds egress entries are redirected to (:func:`proxy_message`).
    """
    applied = outcome.applied
    wanted = outcome.wanted or applied
    status = reports.NodeStatusReport(
        node=node,
        applied_revision=applied.revision if applied else 0,
        enforcing=outcome.started and applied is not None and not outcome.datapath_problems,
        error=outcome.error or broken_message(outcome.datapath_problems),
        program_hashes=dict(outcome.program_hashes),
        endpoints=outcome.endpoints,
        last_updated=now,
    )
    out: dict[str, Report] = {keyspace.node_status_key(node): status}
    in_force = {p.uid: p for p in applied.policies} if applied else {}
    if not outcome.error:
        # Everything in force is enforced as wanted (a newer intent still being applied
        # is reported once it is in force), where the kernel shows it.
        problems = dict(outcome.proxy_problems)
        if applied is not None and envoy_config.policies_needing_proxy(applied):
            problems["http"] = proxy(applied) if proxy is not None else "no L7 proxy on this node"
        for uid, ref in sorted(in_force.items()):
            assert applied is not None
            missing = not_in_kernel(applied, uid, outcome)
            broken = outcome.datapath_problems
            message = proxy_message(applied, uid, problems, egress_proxies)
            out[keyspace.report_key(uid, node)] = reports.PolicyReport(
                node=node, policy_uid=uid, kind=ref.kind, namespace=ref.namespace, name=ref.name,
                generation=ref.generation, ok=True, enforcing=not missing and not broken and not message,
                last_updated=now,
                error=broken_message(broken) or missing_message(missing, applied.revision) or message,
                local_policy_revision=applied.revision)
        return out
    policies = {p.uid: p for p in (wanted.policies if wanted else ())}
    if outcome.error_kind == "InvalidIntent":
        policies = {**in_force, **policies}
    for uid, ref in sorted(policies.items()):
        old = in_force.get(uid)
        kernel_ok = (applied is not None and not not_in_kernel(applied, uid, outcome)
                     and not outcome.datapath_problems)
        out[keyspace.report_key(uid, node)] = reports.PolicyReport(
            node=node, policy_uid=uid, kind=ref.kind, namespace=ref.namespace, name=ref.name,
            generation=old.generation if old else ref.generation, ok=False, enforcing=old is not None and kernel_ok,
            error=outcome.error, last_updated=now,
            local_policy_revision=applied.revision if applied is not None and old is not None else 0,
            annotations={"errorKind": outcome.error_kind} if outcome.error_kind else {})
    return out


def not_in_kernel(applied: intents.NodeIntent, uid: str, outcome: enforcing.Outcome) -> list[str]:
    """The local pods policy ``uid`` selects that the kernel's endpoint map does not show at ``applied``'s revision.

    Local: the pod has a veth on this node (the registry, read with the map). An
    intent in which no endpoint lists the policy (hand-built, or older) makes every
    endpoint count.
    """
    selected = [e for e in applied.endpoints if uid in e.policies] or list(applied.endpoints)
    stamp = planning.revision_stamp(applied.revision)
    kernel = outcome.kernel_endpoints
    return [f"{e.namespace}/{e.pod} ({e.ipv4})" for e in selected
            if e.ipv4 in outcome.local_endpoints and (kernel is None or kernel.get(e.ipv4) != stamp)]


def proxy_needs(applied: intents.NodeIntent, uid: str) -> tuple[set[str], set[str]]:
    """(ingress, egress): the kinds of node-local proxy policy ``uid``'s entries on this node need.

    Ingress HTTP rules the node's Envoy reads need ``"http"``; any other ingress L7 entry (HTTP
    inside TLS, Kafka, ...) needs ``"<parser> (no ingress proxy)"``, which no node runs; egress
    L7 entries need their parser, ``toFQDNs`` the DNS proxy (``planning.needed_proxy``); egress HTTP
    rules Envoy cannot read (inside TLS) need ``"http (no ...)"`` too. Visibility entries (a pod's
    proxy-visibility annotation) need nothing: visibility is not policy."""
    ingress: set[str] = set()
    egress: set[str] = set()
    for endpoint in applied.endpoints:
        for entry in endpoint.ingress.entries:
            if entry.visibility or not any(r.uid == uid for r in entry.rules):
                continue
            kind = planning.needed_proxy(entry)
            if entry.http is not None:
                ingress.add("http")
            elif kind is not None:
                ingress.add(f"{kind}{UNPROXIED}")
        for entry in endpoint.egress.entries:
            if entry.visibility or not any(r.uid == uid for r in entry.rules):
                continue
            kind = planning.needed_proxy(entry)
            if kind == "http" and entry.http is None:
                egress.add(f"{kind}{UNPROXIED}")
            elif kind is not None:
                egress.add(kind)
            if entry.identity in applied.fqdn_selectors:
                egress.add("dns")
    return ingress, egress


UNPROXIED = " (no proxy reads it)"
"""Suffix of a kind whose rules no proxy on any node reads (:func:`proxy_needs`)."""


def proxy_parsers(applied: intents.NodeIntent, uid: str) -> set[str]:
    """Every kind of node-local proxy policy ``uid``'s entries on this node need (:func:`proxy_needs`)."""
    ingress, egress = proxy_needs(applied, uid)
    return ingress | egress


def proxy_message(applied: intents.NodeIntent, uid: str, problems: Mapping[str, str],
                  egress_proxies: Set[str] | None = None) -> str:
    """Why the proxies policy ``uid`` needs cannot enforce it here (empty: they can, or it needs none).

    ``problems``: proxy kind -> its problem ("" when it runs; ``"http"`` is the node's Envoy).
    ``egress_proxies``: the kinds the datapath redirects egress entries to (``Datapath.proxy_ports``;
    None: the kinds in ``problems`` other than ``"http"``, whose Envoy serves ingress). A needed
    kind without a proxy here is a problem of its own: the datapath drops that traffic
    (``PROXY_UNAVAILABLE``, ``planning.entry_flags``), so the policy is not enforced as written.
    """
    ingress, egress = proxy_needs(applied, uid)
    redirected = set(problems) - {"http"} if egress_proxies is None else set(egress_proxies)
    found: list[str] = []
    for kind in sorted(ingress):
        if kind.endswith(UNPROXIED):
            found.append(_no_proxy("ingress", kind.removesuffix(UNPROXIED), unreadable=True))
        elif problems.get(kind):
            found.append(problems[kind])
    for kind in sorted(egress):
        if kind.endswith(UNPROXIED):
            found.append(_no_proxy("egress", kind.removesuffix(UNPROXIED), unreadable=True))
        elif problems.get(kind):
            found.append(problems[kind])
        elif kind not in redirected:
            found.append(_no_proxy("egress", kind))
    return "; ".join(dict.fromkeys(found))


def _no_proxy(direction: str, kind: str, *, unreadable: bool = False) -> str:
    why = (" reads these rules (e.g. HTTP inside TLS without both contexts or without its Secret, or a header "
           "value from a Secret: see the policy's status)") if unreadable and kind == "http" else " on this node"
    return f"no {direction} {kind} proxy{why}: the traffic of those rules is dropped (PROXY_UNAVAILABLE)"


def broken_message(problems: tuple[str, ...]) -> str:
    """The datapath's own check failed (a program detached, a pin gone): nothing it holds counts as enforcing."""
    return f"datapath broken: {'; '.join(problems)}" if problems else ""


def missing_message(missing: list[str], revision: int) -> str:
    if not missing:
        return ""
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"not in the kernel's endpoint map at revision {revision}: {', '.join(missing[:5])}{more}"


def _content(report: Report) -> dict[str, Any]:
    return report.model_dump(mode="json", exclude={"last_updated"})


def changed(old: Report | None, new: Report) -> bool:
    """Does ``new`` differ from ``old`` in anything but lastUpdated?"""
    return old is None or type(old) is not type(new) or _content(old) != _content(new)


def plan_writes(written: Mapping[str, Report], desired: Mapping[str, Report]) -> tuple[dict[str, Report], list[str]]:
    """(puts, deletes) that turn ``written`` into ``desired``."""
    puts = {k: r for k, r in desired.items() if changed(written.get(k), r)}
    deletes = sorted(k for k in written if k not in desired)
    return puts, deletes


def parse_report(key: str, raw: bytes) -> Report | None:
    try:
        if key.startswith(keyspace.NODE_STATUS_PREFIX):
            return reports.parse_node_status(raw)
        return reports.parse_policy_report(raw)
    except ValueError:
        return None


class Reporter:
    """Writes :func:`desired_reports` under the lease whenever they change."""

    def __init__(self, *, node: str, lease: Callable[[], Any], client: Callable[[], Any | None],
                 outcome: Callable[[], enforcing.Outcome], now: Callable[[], str] = now_rfc3339,
                 direct: Any | None = None, proxy: Callable[[intents.NodeIntent], str] | None = None,
                 egress_proxies: Callable[[], Set[str] | None] | None = None) -> None:
        self.node = node
        self.direct = direct
        """A ``direct_status.DirectStatusWriter`` in direct mode: policy status written by this agent too."""
        self._lease = lease
        self._client = client
        self._outcome = outcome
        self._now = now
        self._proxy = proxy
        self._egress_proxies = egress_proxies
        self._wake = asyncio.Event()
        self.written: dict[str, Report] = {}
        self.written_lease: int | None = None
        self.writes = 0
        self.deletes = 0

    def poke(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            if stop.is_set():
                return
            self._wake.clear()
            try:
                await self.sync_once()
            except ETCD_ERRORS as exc:
                log.warning("Could not write reports; will retry", extra={"node": self.node, "error": repr(exc)})
                self.written_lease = None  # re-read etcd next time

    async def sync_once(self) -> bool:
        """One pass; False when there is no lease or client yet."""
        lease, client = self._lease(), self._client()
        if lease is None or client is None:
            return False
        if lease.id != self.written_lease:
            await self._adopt(client, lease.id)
        desired = desired_reports(self.node, self._outcome(), now=self._now(), proxy=self._proxy,
                                  egress_proxies=self._egress_proxies() if self._egress_proxies else None)
        puts, deletes = plan_writes(self.written, desired)
        for key, report in puts.items():
            await asyncio.wait_for(client.put(key.encode(), report.to_wire(), lease=lease), 5)
            self.written[key] = report
            self.writes += 1
            if self.direct is not None and isinstance(report, reports.PolicyReport):
                await self._direct(self.direct.write, report)
        for key in deletes:
            await asyncio.wait_for(client.delete(key.encode()), 5)
            gone = self.written.pop(key, None)
            self.deletes += 1
            if self.direct is not None and isinstance(gone, reports.PolicyReport):
                await self._direct(self.direct.remove, gone)
        if puts or deletes:
            log.info("Reports written", extra={"node": self.node, "puts": len(puts), "deletes": len(deletes),
                                               "lease": lease.id})
        self.written_lease = lease.id
        if self.direct is not None:
            await self.direct.retry()
        return True

    async def _direct(self, call: Callable[[reports.PolicyReport], Any], report: reports.PolicyReport) -> None:
        """Direct status is best effort (the writer logs its failures): the etcd report stays the truth."""
        await call(report)

    async def _adopt(self, client: Any, lease_id: int) -> None:
        """Learn what etcd holds for this node; keep only reports already under ``lease_id``."""
        self.written = {}
        keys = [keyspace.node_status_key(self.node)]
        # only this node's prefix: an agent's etcd user may read nothing else (``store.access``)
        response = await asyncio.wait_for(client.get_prefix(keyspace.node_reports_prefix(self.node).encode()), 10)
        keys += [bytes(kv.key).decode() for kv in response]
        status = await asyncio.wait_for(client.get(keys[0].encode()), 5)
        by_key = {bytes(kv.key).decode(): kv for kv in response}
        if status is not None:
            by_key[keys[0]] = status
        for key in keys:
            kv = by_key.get(key)
            if kv is None:
                continue
            report = parse_report(key, bytes(kv.value))
            if report is not None and int(getattr(kv, "lease", 0)) == lease_id:
                self.written[key] = report
            else:
                # another lease (a previous process) or unreadable: rewrite it or delete it
                self.written[key] = _placeholder(key, self.node)


def _placeholder(key: str, node: str) -> Report:
    """A report that differs from anything desired, so the key is rewritten or deleted."""
    if key.startswith(keyspace.NODE_STATUS_PREFIX):
        return reports.NodeStatusReport(node=node, applied_revision=-1, enforcing=False, error="(stale)",
                                        last_updated="")
    return reports.PolicyReport(node=node, policy_uid="(stale)", kind="CiliumNetworkPolicy", name="(stale)",
                                ok=False, enforcing=False, error="(stale)", last_updated="",
                                local_policy_revision=-1)

