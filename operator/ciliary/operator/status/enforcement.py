"""Pure core of the status handover: node reports + node intents -> a policy's ``.status``.

``handover`` (the async shell) keeps, per policy, the reports agents wrote into
etcd and the nodes whose published NodeIntent lists the policy; it calls
:func:`desired_status` and :func:`status_patch` here to know what ``.status``
should say and the smallest JSON merge patch (RFC 7386) that gets it there, or
``None`` when nothing worth a write changed (``flush_schedule`` decides when a
changed policy may be written: at most once per interval). No I/O, no clock.

Decisions (also in the operator's docs):

- ``.status.nodes`` lists every node that reports the policy and still exists;
  an entry goes away (merge-patch ``null``) when its report key is deleted
  (lease expired or revoked) or the Node object is deleted.
- A change of ``lastUpdated`` alone is never written.
- ``Enforced`` is True when every *expected* node (its NodeIntent lists the
  policy) reports ok + enforcing at the policy's current ``metadata.generation``
  and at a ``localPolicyRevision`` no older than the intent revision from which
  it had to enforce that version. A policy that selects no endpoint is
  ``Enforced=True`` with reason ``NoEndpoints`` once the operator has resolved
  its current generation. An invalid current generation is ``Enforced=False``
  (``InvalidPolicy``): the previous version may be in force, the current one
  is not.
- A policy with parts that are not enforced exactly as written
  (``policy.support``: L7 rules, toFQDNs, toServices, nodeSelector, ...) is never
  ``Enforced=True``: where it would be (every expected node enforcing, or no
  endpoint selected) it is ``Enforced=False`` with reason ``PartiallyEnforced``
  and a message naming what is not enforced.
- ``status.enforcement`` is ``"N/M nodes"``: expected nodes enforcing / expected nodes.
- A roll-out in progress is not narrated node by node: once ``Enforced=False``
  for the current generation is written, a change that only says "more nodes
  caught up" (no node in error, not all done) waits up to the progress interval;
  the write that completes the roll-out, and any error, go out at the next
  interval. ``DesiredStatus.catching_up`` tells the handover which case it is.
- The handover is the only writer of ``.status.conditions``: the ``Valid``
  condition (from the policy handlers' validation) travels in the same patch as
  ``Enforced``, so a policy edit costs one write for both and no writer can
  overwrite the other's condition (no resourceVersion precondition is needed).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliary.operator.status import validity
from ciliary.operator.status.reports import PolicyReport, status_nodes_entry

ENFORCED = "Enforced"
PARTIALLY_ENFORCED = "PartiallyEnforced"
MAX_NAMED_NODES = 10
"""Nodes named in the Enforced message before "and N more"."""
VOLATILE_KEYS = frozenset({"lastUpdated"})
"""Entry keys whose change alone never causes a status write."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """A node that must enforce a policy (the policy is in the node's published NodeIntent)."""

    generation: int
    """metadata.generation in the node's intent PolicyRef."""
    since_revision: int = 0
    """Intent revision from which the node had to enforce this generation; 0 = not known (start-up)."""


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What the handover knows of one policy object (from its latest watch event or write)."""

    uid: str
    kind: str
    namespace: str
    name: str
    generation: int
    resource_version: str
    status: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicyView:
        meta = body.get("metadata") or {}
        return cls(uid=str(meta.get("uid", "")), kind=str(body.get("kind", "")),
                   namespace=str(meta.get("namespace") or ""), name=str(meta.get("name", "")),
                   generation=int(meta.get("generation") or 0),
                   resource_version=str(meta.get("resourceVersion", "")),
                   status=dict(body.get("status") or {}))

    @property
    def invalid(self) -> bool:
        """The Valid condition refuses the current generation."""
        return refuses_current(validity.current_condition({"status": self.status}, "Valid"), self.generation)

    def where(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class DesiredStatus:
    """The part of ``.status`` the handover owns."""

    enforced: dict[str, Any]
    enforcement: str
    nodes: dict[str, dict[str, Any]] | None
    """None: node entries are not ours to write (direct mode)."""
    valid: dict[str, Any] | None = None
    """The ``Valid`` condition the policy handlers computed (without lastTransitionTime); None: not known yet."""
    catching_up: bool = False
    """Not enforced only because some expected nodes have not reported the current version yet (no error)."""


def node_problem(report: PolicyReport | None, expected: Expectation, generation: int) -> str | None:
    """Why an expected node does not (yet) enforce the policy's current generation; None if it does."""
    if report is None:
        return "no report"
    if report.error or not report.ok:
        return "error"
    if report.generation != generation:
        return f"at generation {report.generation}"
    if not report.enforcing:
        return "not enforcing"
    if report.local_policy_revision < expected.since_revision:
        return f"at revision {report.local_policy_revision} < {expected.since_revision}"
    return None


def node_entries(reports: Mapping[str, PolicyReport], present: Collection[str] | None) -> dict[str, dict[str, Any]]:
    """``.status.nodes``: one entry per reporting node that still exists (``present`` None = all)."""
    return {node: status_nodes_entry(report) for node, report in reports.items()
            if present is None or node in present}


def _name_nodes(problems: Iterable[tuple[str, str]]) -> str:
    items = sorted(problems)
    named = ", ".join(f"{node} ({why})" for node, why in items[:MAX_NAMED_NODES])
    more = len(items) - MAX_NAMED_NODES
    return named + (f" and {more} more" if more > 0 else "")


def refuses_current(valid: Mapping[str, Any] | None, generation: int) -> bool:
    """The ``Valid`` condition ``valid`` refuses ``generation``."""
    return valid is not None and valid.get("status") == "False" and \
        int(valid.get("observedGeneration") or 0) == generation


def enforced_condition(policy: PolicyView, expected: Mapping[str, Expectation],
                       reports: Mapping[str, PolicyReport], *, present: Collection[str] | None = None,
                       resolved_generation: int | None = None, resolution_known: bool = False,
                       valid: Mapping[str, Any] | None = None,
                       unenforced: str | None = "") -> tuple[dict[str, Any], str]:
    """The ``Enforced`` condition (without lastTransitionTime) and the ``N/M nodes`` summary.

    ``resolution_known``: the caller knows which generation the operator resolved
    (``resolved_generation``; None then means "not resolved"); otherwise the
    published intents are taken as current. ``valid``: the Valid condition about
    to be written (None: the one the object shows decides). ``unenforced``: what
    of the current generation is not enforced as written ("" nothing; None: not
    assessed yet, so it cannot be True).
    """
    gen = policy.generation
    targets = {n: e for n, e in expected.items() if present is None or n in present}
    problems = [(n, why) for n, e in targets.items() if (why := node_problem(reports.get(n), e, gen))]
    enforcing = len(targets) - len(problems)
    summary = f"{enforcing}/{len(targets)} nodes"

    def cond(status: bool, reason: str, message: str) -> dict[str, Any]:
        return {"type": ENFORCED, "status": "True" if status else "False", "reason": reason,
                "message": message, "observedGeneration": gen}

    if (refuses_current(valid, gen) if valid is not None else policy.invalid):
        return cond(False, "InvalidPolicy", f"Generation {gen} was refused (see the Valid condition); "
                                            "it is enforced nowhere"), summary
    if resolution_known and resolved_generation != gen:
        return cond(False, "Pending", f"Generation {gen} is not yet resolved into node intents"), summary
    if unenforced is None and not problems:
        return cond(False, "Pending", f"Generation {gen} is not yet assessed"), summary
    if not targets:
        if unenforced:
            return cond(False, PARTIALLY_ENFORCED, "The policy selects no endpoint now; where it does, "
                                                   f"this is not enforced: {unenforced}"), summary
        return cond(True, "NoEndpoints", "The policy selects no endpoint; there is nothing to enforce"), summary
    if not problems:
        if unenforced:
            return cond(False, PARTIALLY_ENFORCED, f"Only its L3/L4 part is enforced on the {len(targets)} "
                                                   f"nodes hosting selected endpoints; not enforced: "
                                                   f"{unenforced}"), summary
        return cond(True, "Enforced", f"Enforced on all {len(targets)} nodes hosting selected endpoints"), summary
    partly = f"; not enforced as written anywhere: {unenforced}" if unenforced else ""
    return cond(False, "NodesNotEnforcing", f"Enforced on {enforcing} of {len(targets)} nodes; "
                                            f"not on {_name_nodes(problems)}{partly}"), summary


def node_failed(report: PolicyReport | None, generation: int) -> bool:
    """The node reports a failure for the policy (``node_problem`` "error" or "not enforcing"),
    as opposed to merely not having caught up with ``generation`` yet."""
    if report is None:
        return False
    return bool(report.error) or not report.ok or (report.generation == generation and not report.enforcing)


def catching_up(condition: Mapping[str, Any], expected: Mapping[str, Expectation],
                reports: Mapping[str, PolicyReport], generation: int) -> bool:
    """``condition`` (an Enforced condition) is False only because nodes have not caught up yet."""
    if condition["reason"] != "NodesNotEnforcing":
        return False
    return not any(node_failed(reports.get(node), generation) for node in expected)


def desired_status(policy: PolicyView, expected: Mapping[str, Expectation], reports: Mapping[str, PolicyReport],
                   *, present: Collection[str] | None = None, write_nodes: bool = True,
                   resolved_generation: int | None = None, resolution_known: bool = False,
                   valid: Mapping[str, Any] | None = None, unenforced: str | None = "") -> DesiredStatus:
    enforced, summary = enforced_condition(policy, expected, reports, present=present,
                                           resolved_generation=resolved_generation,
                                           resolution_known=resolution_known, valid=valid, unenforced=unenforced)
    nodes = node_entries(reports, present) if write_nodes else None
    return DesiredStatus(enforced=enforced, enforcement=summary, nodes=nodes,
                         valid=dict(valid) if valid is not None else None,
                         catching_up=catching_up(enforced, expected, reports, policy.generation))


def holds_progress(policy: PolicyView, desired: DesiredStatus) -> bool:
    """A write of ``desired`` would only report roll-out progress the object already says is under way.

    True when the current generation is still catching up (no error) and the
    object already shows ``Enforced=False`` for that generation; the handover
    then waits for the progress interval (or for the roll-out to complete).
    """
    if not desired.catching_up:
        return False
    shown = validity.current_condition({"status": policy.status}, ENFORCED)
    if shown is None or shown.get("status") != "False" or int(shown.get("observedGeneration") or 0) != \
            policy.generation:
        return False
    if desired.valid is not None and validity.needs_write({"status": policy.status}, desired.valid):
        return False
    before, now = _counts(str(policy.status.get("enforcement", ""))), _counts(desired.enforcement)
    # only forward progress waits: a node lost or added since the last write is news
    return before is not None and now is not None and now[1] == before[1] and now[0] >= before[0]


def _counts(summary: str) -> tuple[int, int] | None:
    """``"N/M nodes"`` -> (N, M)."""
    head, _, rest = summary.partition(" ")
    done, _, total = head.partition("/")
    if rest != "nodes" or not done.isdigit() or not total.isdigit():
        return None
    return int(done), int(total)


def _strip(value: Any, ignore: Collection[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in ignore}
    return value


def merge_diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``desired`` (empty: equal)."""
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = current.get(key, _MISSING)
        if have == want:
            continue
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_diff(have, want)
            if sub:
                patch[key] = sub
        else:
            patch[key] = want
    for key in current:
        if key not in desired:
            patch[key] = None
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 ``MergePatch(target, patch)`` (used by tests and to predict the server's result)."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def nodes_patch(current: Mapping[str, Any], desired: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Merge patch of ``.status.nodes``; an entry whose only change is ``lastUpdated`` is left alone."""
    patch: dict[str, Any] = {}
    for node, want in desired.items():
        have = current.get(node)
        if isinstance(have, Mapping) and _strip(have, VOLATILE_KEYS) == _strip(want, VOLATILE_KEYS):
            continue
        patch[node] = merge_diff(have, want) if isinstance(have, Mapping) else dict(want)
    for node in current:
        if node not in desired:
            patch[node] = None
    return patch


def status_patch(policy: PolicyView, desired: DesiredStatus) -> dict[str, Any] | None:
    """The merge patch to send to the status subresource, or None when nothing worth a write changed.

    Conditions are a list, which a merge patch replaces whole: the patch carries
    every condition the object shows, with ``Enforced`` and ``Valid`` replaced
    where they changed (the handover writes them all, so no precondition).
    """
    status = policy.status
    body: dict[str, Any] = {"status": status}
    out: dict[str, Any] = {}
    if desired.nodes is not None:
        nodes = nodes_patch(status.get("nodes") or {}, desired.nodes)
        if nodes:
            out["nodes"] = nodes
    if status.get("enforcement") != desired.enforcement:
        out["enforcement"] = desired.enforcement
    wanted = [desired.enforced] if desired.valid is None else [desired.enforced, desired.valid]
    merged = body
    for condition in wanted:
        if validity.needs_write(body, condition):
            merged = {"status": {"conditions": validity.merged_conditions(merged, condition)}}
    if merged is not body:
        out["conditions"] = merged["status"]["conditions"]
    if status.get("observedGeneration") != policy.generation and out:
        out["observedGeneration"] = policy.generation
    if not out:
        return None
    return {"status": out}
