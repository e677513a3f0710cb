"""The pure core of the status handover: Enforced, node entries, quiet patches, batching."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.status import enforcement
from ciliary.operator.status.enforcement import Expectation, PolicyView
from ciliary.operator.status.flush_schedule import FlushSchedule
from ciliary.operator.status.reports import PolicyReport, status_nodes_entry

UID = "u-1"


def report(node: str, *, gen: int = 2, rev: int = 10, ok: bool = True, enforcing: bool = True,
           error: str = "", at: str = "2025-01-01T00:00:00Z", annotations: dict[str, str] | None = None
           ) -> PolicyReport:
    return PolicyReport(node=node, policy_uid=UID, kind="CiliumNetworkPolicy", namespace="ns", name="p",
                        generation=gen, ok=ok, enforcing=enforcing, error=error, last_updated=at,
                        local_policy_revision=rev, annotations=annotations or {})


def policy(gen: int = 2, status: dict[str, Any] | None = None, rv: str = "100") -> PolicyView:
    return PolicyView(uid=UID, kind="CiliumNetworkPolicy", namespace="ns", name="p", generation=gen,
                      resource_version=rv, status=status or {})


EXP = Expectation(generation=2, since_revision=10)


@pytest.mark.parametrize(("rep", "expected", "problem"), [
    (None, EXP, "no report"),
    (report("a"), EXP, None),
    (report("a", rev=11), EXP, None),
    (report("a", rev=9), EXP, "at revision 9 < 10"),
    (report("a", rev=1), Expectation(2, 0), None),
    (report("a", gen=1), EXP, "at generation 1"),
    (report("a", enforcing=False), EXP, "not enforcing"),
    (report("a", ok=False, enforcing=False), EXP, "error"),
    (report("a", error="map full"), EXP, "error"),
])
def test_node_problem(rep: PolicyReport | None, expected: Expectation, problem: str | None) -> None:
    assert enforcement.node_problem(rep, expected, 2) == problem


def _cond(pol: PolicyView, expected: dict[str, Expectation], reports: dict[str, PolicyReport],
          **kw: Any) -> tuple[str, str, str]:
    cond, summary = enforcement.enforced_condition(pol, expected, reports, **kw)
    assert cond["type"] == "Enforced" and cond["observedGeneration"] == pol.generation
    return cond["status"], cond["reason"], summary


INVALID = {"conditions": [{"type": "Valid", "status": "False", "reason": "InvalidPolicy", "message": "x",
                           "observedGeneration": 2}]}
INVALID_OLD = {"conditions": [{"type": "Valid", "status": "False", "reason": "InvalidPolicy", "message": "x",
                               "observedGeneration": 1}]}


@pytest.mark.parametrize(("pol", "expected", "reports", "kw", "want"), [
    # every expected node enforces the current generation
    (policy(), {"a": EXP, "b": EXP}, {"a": report("a"), "b": report("b")}, {}, ("True", "Enforced", "2/2 nodes")),
    # one node missing
    (policy(), {"a": EXP, "b": EXP}, {"a": report("a")}, {}, ("False", "NodesNotEnforcing", "1/2 nodes")),
    # an extra reporting node that is not expected does not count
    (policy(), {"a": EXP}, {"a": report("a"), "z": report("z", gen=1)}, {}, ("True", "Enforced", "1/1 nodes")),
    # a stale generation
    (policy(), {"a": EXP}, {"a": report("a", gen=1)}, {}, ("False", "NodesNotEnforcing", "0/1 nodes")),
    # nothing selected, resolution of the current generation known
    (policy(), {}, {}, {"resolution_known": True, "resolved_generation": 2}, ("True", "NoEndpoints", "0/0 nodes")),
    # nothing selected yet, current generation not resolved
    (policy(), {}, {}, {"resolution_known": True, "resolved_generation": 1}, ("False", "Pending", "0/0 nodes")),
    (policy(), {}, {}, {"resolution_known": True}, ("False", "Pending", "0/0 nodes")),
    # without a resolution hook, published intents are taken as current
    (policy(), {}, {}, {}, ("True", "NoEndpoints", "0/0 nodes")),
    # the current generation is invalid
    (policy(status=INVALID), {"a": EXP}, {"a": report("a")}, {}, ("False", "InvalidPolicy", "1/1 nodes")),
    # an older generation was invalid: irrelevant now
    (policy(status=INVALID_OLD), {"a": EXP}, {"a": report("a")}, {}, ("True", "Enforced", "1/1 nodes")),
    # a deleted Node is neither expected nor listed
    (policy(), {"a": EXP, "gone": EXP}, {"a": report("a")}, {"present": {"a"}}, ("True", "Enforced", "1/1 nodes")),
])
def test_enforced_condition(pol: PolicyView, expected: dict[str, Expectation], reports: dict[str, PolicyReport],
                            kw: dict[str, Any], want: tuple[str, str, str]) -> None:
    assert _cond(pol, expected, reports, **kw) == want


def test_enforced_message_names_nodes_and_caps_the_list() -> None:
    expected = {f"n{i:02}": EXP for i in range(15)}
    cond, summary = enforcement.enforced_condition(policy(), expected, {"n00": report("n00", error="boom")})
    assert summary == "0/15 nodes"
    assert "n00 (error)" in cond["message"] and "n01 (no report)" in cond["message"]
    assert cond["message"].endswith("and 5 more")


def test_node_entries_drop_departed_nodes() -> None:
    reports = {"a": report("a"), "b": report("b")}
    assert set(enforcement.node_entries(reports, None)) == {"a", "b"}
    assert set(enforcement.node_entries(reports, {"b", "c"})) == {"b"}


def _status_after(pol: PolicyView, patch: dict[str, Any] | None) -> PolicyView:
    if patch is None:
        return pol
    status = enforcement.apply_merge_patch(dict(pol.status), patch["status"])
    return PolicyView(pol.uid, pol.kind, pol.namespace, pol.name, pol.generation, "101", status)


def test_patch_then_quiet() -> None:
    pol = policy()
    reports = {"a": report("a"), "b": report("b")}
    desired = enforcement.desired_status(pol, {"a": EXP, "b": EXP}, reports)
    patch = enforcement.status_patch(pol, desired)
    assert patch is not None
    assert "metadata" not in patch  # the handover is the one writer of conditions: no precondition
    assert set(patch["status"]["nodes"]) == {"a", "b"}
    assert patch["status"]["enforcement"] == "2/2 nodes"
    assert patch["status"]["observedGeneration"] == 2
    after = _status_after(pol, patch)
    assert after.status["nodes"]["a"] == status_nodes_entry(reports["a"])
    # the same picture again (an operator restart, a repeated event): nothing to write
    assert enforcement.status_patch(after, enforcement.desired_status(after, {"a": EXP, "b": EXP}, reports)) is None


def test_last_updated_alone_is_not_written_but_travels_with_a_real_change() -> None:
    pol = policy()
    expected = {"a": EXP}
    after = _status_after(pol, enforcement.status_patch(pol, enforcement.desired_status(
        pol, expected, {"a": report("a")})))
    later = {"a": report("a", at="2025-01-01T00:05:00Z")}
    assert enforcement.status_patch(after, enforcement.desired_status(after, expected, later)) is None
    changed = {"a": report("a", rev=12, at="2025-01-01T00:06:00Z")}
    patch = enforcement.status_patch(after, enforcement.desired_status(after, expected, changed))
    assert patch is not None
    assert patch["status"]["nodes"] == {"a": {"localPolicyRevision": 12, "lastUpdated": "2025-01-01T00:06:00Z"}}
    assert "conditions" not in patch and "metadata" not in patch


def test_departed_node_entry_is_removed_with_null_and_enforced_turns_false() -> None:
    pol = policy()
    expected = {"a": EXP, "b": EXP}
    both = {"a": report("a"), "b": report("b")}
    after = _status_after(pol, enforcement.status_patch(pol, enforcement.desired_status(pol, expected, both)))
    patch = enforcement.status_patch(after, enforcement.desired_status(after, expected, {"a": report("a")}))
    assert patch is not None
    assert patch["status"]["nodes"] == {"b": None}
    enforced = next(c for c in patch["status"]["conditions"] if c["type"] == "Enforced")
    assert enforced["status"] == "False" and "b (no report)" in enforced["message"]


def test_cleared_error_is_nulled() -> None:
    pol = policy()
    after = _status_after(pol, enforcement.status_patch(pol, enforcement.desired_status(
        pol, {"a": EXP}, {"a": report("a", error="boom", ok=False, enforcing=False)})))
    assert after.status["nodes"]["a"]["error"] == "boom"
    patch = enforcement.status_patch(after, enforcement.desired_status(after, {"a": EXP}, {"a": report("a")}))
    assert patch is not None and patch["status"]["nodes"]["a"]["error"] is None


def test_direct_mode_leaves_node_entries_alone() -> None:
    pol = policy(status={"nodes": {"x": {"ok": True}}})
    desired = enforcement.desired_status(pol, {"a": EXP}, {"a": report("a")}, write_nodes=False)
    patch = enforcement.status_patch(pol, desired)
    assert patch is not None and "nodes" not in patch["status"]


def test_valid_condition_is_kept_and_transition_time_preserved() -> None:
    valid = {"type": "Valid", "status": "True", "reason": "Validated", "message": "ok", "observedGeneration": 2,
             "lastTransitionTime": "2025-01-01T00:00:00Z"}
    pol = policy(status={"conditions": [valid]})
    patch = enforcement.status_patch(pol, enforcement.desired_status(pol, {"a": EXP}, {"a": report("a")}))
    assert patch is not None
    types = [c["type"] for c in patch["status"]["conditions"]]
    assert types == ["Enforced", "Valid"]
    assert patch["status"]["conditions"][1] == valid


VALID_NOW = {"type": "Valid", "status": "True", "reason": "Validated", "message": "ok", "observedGeneration": 2}
REFUSED_NOW = {"type": "Valid", "status": "False", "reason": "InvalidPolicy", "message": "port 70000",
               "observedGeneration": 2}


def test_valid_travels_with_enforced_in_one_patch_and_keeps_its_transition_time() -> None:
    pol = policy()
    patch = enforcement.status_patch(pol, enforcement.desired_status(pol, {"a": EXP}, {"a": report("a")},
                                                                     valid=VALID_NOW))
    assert patch is not None
    conds = {c["type"]: c for c in patch["status"]["conditions"]}
    assert set(conds) == {"Enforced", "Valid"}
    assert {k: conds["Valid"][k] for k in VALID_NOW} == VALID_NOW and conds["Valid"]["lastTransitionTime"]
    after = _status_after(pol, patch)
    # nothing changed: nothing to write; the same validity for a new generation: one patch, time kept
    assert enforcement.status_patch(after, enforcement.desired_status(after, {"a": EXP}, {"a": report("a")},
                                                                      valid=VALID_NOW)) is None
    newer = PolicyView(after.uid, after.kind, after.namespace, after.name, 3, "102", after.status)
    patch = enforcement.status_patch(newer, enforcement.desired_status(
        newer, {"a": Expectation(3)}, {"a": report("a")}, valid={**VALID_NOW, "observedGeneration": 3}))
    assert patch is not None
    conds3 = {c["type"]: c for c in patch["status"]["conditions"]}
    assert conds3["Valid"]["observedGeneration"] == 3
    assert conds3["Valid"]["lastTransitionTime"] == conds["Valid"]["lastTransitionTime"]
    assert conds3["Enforced"]["status"] == "False"  # node a still reports generation 2


def test_a_refusal_not_yet_written_already_decides_enforced() -> None:
    pol = policy(status={"conditions": [dict(VALID_NOW, lastTransitionTime="2025-01-01T00:00:00Z")]})
    desired = enforcement.desired_status(pol, {"a": EXP}, {"a": report("a")}, valid=REFUSED_NOW)
    assert (desired.enforced["status"], desired.enforced["reason"]) == ("False", "InvalidPolicy")
    patch = enforcement.status_patch(pol, desired)
    assert patch is not None
    valid = next(c for c in patch["status"]["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and valid["lastTransitionTime"] != "2025-01-01T00:00:00Z"


# ------------------------------------------------------------------ merge patches

KEYS = st.sampled_from(["a", "b", "c"])
json_scalars = st.one_of(st.booleans(), st.integers(-2, 2), st.sampled_from(["x", "y"]))
json_objects = st.recursive(
    st.dictionaries(KEYS, json_scalars, max_size=3),
    lambda children: st.dictionaries(KEYS, st.one_of(json_scalars, children), max_size=3),
    max_leaves=8,
)
RELAXED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@RELAXED
@given(json_objects, json_objects)
def test_merge_diff_turns_current_into_desired(current: dict[str, Any], desired: dict[str, Any]) -> None:
    patch = enforcement.merge_diff(current, desired)
    assert enforcement.apply_merge_patch(current, patch) == desired
    assert (patch == {}) == (current == desired)


# ------------------------------------------------------------------ batching

@pytest.mark.parametrize(("events", "expected_writes"), [
    # (time of a change, ...): writes happen at most once per interval (1 s), settle 0.05 s after idle
    ([0.0], [0.05]),
    ([0.0, 0.01, 0.02], [0.05]),
    ([0.0, 0.5], [0.05, 1.05]),
    ([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4], [0.05, 1.05, 2.05]),
    ([0.0, 3.0], [0.05, 3.05]),
])
def test_flush_schedule_writes_at_most_once_per_interval(events: list[float], expected_writes: list[float]) -> None:
    schedule = FlushSchedule(interval=1.0, settle=0.05)
    writes: list[float] = []
    pending = sorted(events)
    t = 0.0
    while t <= 5.0:
        while pending and pending[0] <= t + 1e-9:
            schedule.mark(UID, pending.pop(0))
        if schedule.due(t + 1e-9):
            schedule.wrote(UID, t)
            writes.append(round(t, 2))
        t = round(t + 0.01, 2)
    assert writes == expected_writes


@RELAXED
@given(st.lists(st.floats(0, 10, allow_nan=False), max_size=60))
def test_a_flapping_agent_cannot_cause_more_than_one_write_per_interval(events: list[float]) -> None:
    schedule = FlushSchedule(interval=1.0, settle=0.05)
    writes: list[float] = []
    pending = sorted(events)
    for step in range(1200):
        t = step / 100
        while pending and pending[0] <= t:
            schedule.mark(UID, pending.pop(0))
        if schedule.due(t):
            schedule.wrote(UID, t)
            writes.append(t)
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(writes, writes[1:], strict=False))
    assert schedule.pending == 0  # every change was eventually written


def test_a_change_needing_no_write_does_not_start_an_interval() -> None:
    schedule = FlushSchedule(interval=1.0, settle=0.05)
    schedule.mark(UID, 0.0)
    assert schedule.due(0.05) == [UID]
    schedule.clean(UID)
    schedule.mark(UID, 0.1)
    assert schedule.due(0.16) == [UID]


def test_a_deferred_change_waits_and_a_new_change_ends_the_deferral() -> None:
    schedule = FlushSchedule(interval=1.0, settle=0.05)
    schedule.mark(UID, 0.0)
    schedule.wrote(UID, 0.05)
    schedule.mark(UID, 0.5)
    assert schedule.due(1.05) == [UID]
    schedule.defer(UID, 5.05, now=1.05)  # progress held back
    assert schedule.due(2.0) == [] and schedule.next_deadline() == 5.05
    assert schedule.mark(UID, 2.1)  # something new arrived: look again 0.2 s after deferring (recheck)
    assert not schedule.mark(UID, 2.2)  # more news changes nothing: no more often than that
    assert schedule.due(1.24) == [] and schedule.due(2.3) == [UID]
    schedule.defer(UID, 5.05, now=2.3)  # still catching up
    assert schedule.due(5.0) == [] and schedule.due(5.05) == [UID]


@pytest.mark.parametrize(("reports", "shown", "holds"), [
    # half the nodes caught up, the object already says "not yet" for generation 2: hold
    ({"a": report("a")}, "False", True),
    # every node caught up: write now
    ({"a": report("a"), "b": report("b")}, "False", False),
    # a node in error: write now
    ({"a": report("a"), "b": report("b", error="map full", ok=False)}, "False", False),
    # the object still shows the old generation as Enforced=True: the "not yet" must go out
    ({"a": report("a")}, "True", False),
])
def test_roll_out_progress_is_held_but_completion_errors_and_news_are_not(
        reports: dict[str, PolicyReport], shown: str, holds: bool) -> None:
    enforced = {"type": "Enforced", "status": shown, "reason": "NodesNotEnforcing", "message": "x",
                "observedGeneration": 2 if shown == "False" else 1}
    pol = policy(status={"conditions": [enforced], "enforcement": "0/2 nodes"})
    desired = enforcement.desired_status(pol, {"a": EXP, "b": EXP}, reports)
    assert enforcement.holds_progress(pol, desired) is holds


def test_a_node_lost_during_a_roll_out_is_not_held() -> None:
    enforced = {"type": "Enforced", "status": "False", "reason": "NodesNotEnforcing", "message": "x",
                "observedGeneration": 2}
    pol = policy(status={"conditions": [enforced], "enforcement": "2/3 nodes"})
    three = {"a": EXP, "b": EXP, "c": EXP}
    # b's report vanished (agent died): 1/3 is news even though c is merely catching up
    desired = enforcement.desired_status(pol, three, {"a": report("a")})
    assert desired.catching_up and not enforcement.holds_progress(pol, desired)
    assert enforcement.holds_progress(pol, enforcement.desired_status(pol, three, {"a": report("a"),
                                                                                   "b": report("b")}))
