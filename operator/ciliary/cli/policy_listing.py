"""``ciliary policy get --kind NetworkPolicy``: policies with their per-node enforcement, from etcd.

A Kubernetes NetworkPolicy has no status Ciliary writes, so this listing is
where its enforcement shows besides the operator's Events. Pure core
:func:`summarise`: the published NodeIntents say which nodes must enforce which
policy (and at which generation), the agents' PolicyReports say which do;
:func:`load_reports` reads the reports (the CLI's one etcd read beyond intents).
A policy that selects no pod is in no intent and so is not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ciliary.cli.errors import UserError
from ciliary.cli.targets import EtcdTarget
from ciliary.operator.intents import NodeIntent
from ciliary.operator.status.enforcement import Expectation, node_problem
from ciliary.operator.status.reports import PolicyReport, parse_policy_report
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdUnavailableError


@dataclass(frozen=True)
class PolicyRow:
    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    enforcing: tuple[str, ...]
    problems: tuple[tuple[str, str], ...]
    """(node, why) for every node that must enforce the policy and does not (yet)."""

    @property
    def enforcement(self) -> str:
        return f"{len(self.enforcing)}/{len(self.enforcing) + len(self.problems)} nodes"


def summarise(intents: Mapping[str, NodeIntent], reports: Mapping[tuple[str, str], PolicyReport],
              kind: str | None = None) -> list[PolicyRow]:
    """One row per policy named in any intent (of ``kind`` when given); ``reports`` by (uid, node)."""
    expected: dict[str, dict[str, int]] = {}
    refs = {}
    for node, intent in intents.items():
        for ref in intent.policies:
            if kind is None or ref.kind == kind:
                expected.setdefault(ref.uid, {})[node] = ref.generation
                refs[ref.uid] = ref
    rows = []
    for uid, nodes in expected.items():
        ref = refs[uid]
        enforcing, problems = [], []
        for node, generation in sorted(nodes.items()):
            why = node_problem(reports.get((uid, node)), Expectation(generation), generation)
            if why is None:
                enforcing.append(node)
            else:
                problems.append((node, why))
        rows.append(PolicyRow(ref.kind, ref.namespace, ref.name, uid, ref.generation, tuple(enforcing),
                              tuple(problems)))
    return sorted(rows, key=lambda r: (r.kind, r.namespace, r.name))


async def load_reports(target: EtcdTarget) -> dict[tuple[str, str], PolicyReport]:
    store = target.store(attempts=3)
    try:
        rows = await store.get_prefix(keyspace.REPORTS_PREFIX.encode())
    except EtcdUnavailableError as exc:
        raise UserError(str(exc)) from exc
    finally:
        await store.close()
    out: dict[tuple[str, str], PolicyReport] = {}
    for kv in rows:
        try:
            out[keyspace.report_from_key(kv.key)] = parse_policy_report(kv.value)
        except ValueError:
            continue
    return out


def render(rows: list[PolicyRow]) -> str:
    lines = [f"{'KIND':<16} {'NAMESPACE':<16} {'NAME':<24} {'ENFORCEMENT':<12} NOT ENFORCING"]
    for row in rows:
        missing = ", ".join(f"{node} ({why})" for node, why in row.problems) or "-"
        lines.append(f"{row.kind:<16} {row.namespace:<16} {row.name:<24} {row.enforcement:<12} {missing}")
    return "\n".join(lines) + "\n"
