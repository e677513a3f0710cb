"""StatusHandover and DirectStatusWriter with a fake API (no etcd, no apiserver): wiring of the pure core."""

from __future__ import annotations

import json
from typing import Any

from ciliary.nodeagent.direct_status import DirectStatusWriter
from ciliary.operator.status import enforcement
from ciliary.operator.status.handover import StatusHandover
from ciliary.operator.status.reports import PolicyReport
from ciliary.operator.store import keyspace

UID = "u-1"


class FakeCustom:
    """Applies merge patches to one stored object, like the status subresource would."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.patches: list[dict[str, Any]] = []

    async def patch_namespaced_custom_object_status(self, group: str, version: str, namespace: str, plural: str,
                                                    name: str, patch: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.patches.append(patch)
        self.body["status"] = enforcement.apply_merge_patch(self.body.get("status") or {}, patch["status"])
        meta = self.body["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return json.loads(json.dumps(self.body))


def cnp(generation: int = 1) -> dict[str, Any]:
    return {"kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "ns", "uid": UID, "generation": generation,
                         "resourceVersion": "10"}}


def report(node: str, gen: int = 1, rev: int = 5, at: str = "2025-01-01T00:00:00Z") -> PolicyReport:
    return PolicyReport(node=node, policy_uid=UID, kind="CiliumNetworkPolicy", namespace="ns", name="p",
                        generation=gen, ok=True, enforcing=True, last_updated=at, local_policy_revision=rev)


def intent(node: str, revision: int, gen: int = 1) -> bytes:
    return json.dumps({"node": node, "revision": revision, "policies": [
        {"kind": "CiliumNetworkPolicy", "namespace": "ns", "name": "p", "uid": UID, "generation": gen}]}).encode()


def make(body: dict[str, Any], **kw: Any) -> tuple[StatusHandover, FakeCustom]:
    handover = StatusHandover(None, None, **kw)  # type: ignore[arg-type]
    fake = FakeCustom(body)
    handover.custom = fake  # type: ignore[assignment]
    handover.observe_policy(json.loads(json.dumps(body)))
    return handover, fake


def feed(handover: StatusHandover, nodes: list[str], *, revision: int = 5, gen: int = 1) -> None:
    for node in nodes:
        handover._intent_put(keyspace.node_intent_key(node), intent(node, revision, gen))
        handover._report_put(keyspace.report_key(UID, node), report(node, gen, revision).to_wire())


async def flush_all(handover: StatusHandover) -> None:
    await handover.flush(list(handover.policies))


async def test_one_write_then_quiet_and_a_restart_writes_nothing() -> None:
    handover, fake = make(cnp())
    feed(handover, ["a", "b"])
    await flush_all(handover)
    assert len(fake.patches) == 1
    status = fake.body["status"]
    assert set(status["nodes"]) == {"a", "b"} and status["enforcement"] == "2/2 nodes"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Enforced": "True"}
    await flush_all(handover)  # same picture
    assert len(fake.patches) == 1
    # a new process: same etcd content, same object
    again, fake2 = make(fake.body)
    feed(again, ["a", "b"])
    await flush_all(again)
    assert fake2.patches == []


async def test_lease_expiry_removes_the_entry_and_enforced_turns_false() -> None:
    handover, fake = make(cnp())
    feed(handover, ["a", "b"])
    await flush_all(handover)
    handover._report_deleted(keyspace.report_key(UID, "b"))
    await flush_all(handover)
    assert set(fake.body["status"]["nodes"]) == {"a"}
    enforced = next(c for c in fake.body["status"]["conditions"] if c["type"] == "Enforced")
    assert enforced["status"] == "False" and "b (no report)" in enforced["message"]


async def test_deleted_node_object_removes_the_entry() -> None:
    nodes = {"a", "b"}
    handover, fake = make(cnp(), node_names=lambda: nodes)
    handover._refresh_nodes(force=True)
    feed(handover, ["a", "b"])
    await flush_all(handover)
    nodes.discard("b")
    handover._refresh_nodes(force=True)
    await flush_all(handover)
    assert set(fake.body["status"]["nodes"]) == {"a"}
    assert fake.body["status"]["enforcement"] == "1/1 nodes"


async def test_revision_floor_is_learned_from_intent_changes() -> None:
    handover, fake = make(cnp())
    feed(handover, ["a"], revision=5)
    handover.intent_mirror.synced.set()  # from now on changes are live
    # generation 2 reaches node a in intent revision 7; the node still reports generation 1
    fake.body["metadata"]["generation"] = 2
    handover.observe_policy(json.loads(json.dumps(fake.body)) | {"metadata": {
        **fake.body["metadata"], "resourceVersion": "11"}})
    handover._intent_put(keyspace.node_intent_key("a"), intent("a", 7, gen=2))
    assert handover.expected[UID]["a"] == enforcement.Expectation(2, 7)
    await flush_all(handover)
    assert fake.body["status"]["enforcement"] == "0/1 nodes"
    handover._report_put(keyspace.report_key(UID, "a"), report("a", gen=2, rev=7).to_wire())
    await flush_all(handover)
    assert fake.body["status"]["enforcement"] == "1/1 nodes"


async def test_resolved_but_not_yet_mirrored_intents_are_pending_not_no_endpoints() -> None:
    """The CI failure of stop 19: the operator had published node a's intent (etcd revision 40) but the
    intent watch had not delivered it; "no node lists the policy" read as NoEndpoints, Enforced=True."""
    written = {"revision": 40}
    handover, fake = make(cnp(), resolved_generation=lambda uid: 1,
                          intents_revision=lambda: written["revision"])
    handover.intent_mirror.revision = 39
    handover.unenforced[UID] = (1, "")
    await flush_all(handover)
    enforced = next(c for c in fake.body["status"]["conditions"] if c["type"] == "Enforced")
    assert (enforced["status"], enforced["reason"]) == ("False", "Pending")
    assert UID in handover._lagging
    # the watch delivers the intent (mod revision 40): the policy is marked again and comes out right
    handover.intent_mirror.revision = 40
    handover._intent_put(keyspace.node_intent_key("a"), intent("a", 3))
    handover._report_put(keyspace.report_key(UID, "a"), report("a", rev=3).to_wire())
    handover._mark_caught_up()
    assert not handover._lagging
    await flush_all(handover)
    status = fake.body["status"]
    enforced = next(c for c in status["conditions"] if c["type"] == "Enforced")
    assert (enforced["status"], enforced["reason"]) == ("True", "Enforced") and set(status["nodes"]) == {"a"}
    # a policy that selects nothing, resolved in a pass that wrote another policy's intents: Pending until
    # the mirror has seen that write, then NoEndpoints (marked again without any event of its own)
    handover._intent_deleted(keyspace.node_intent_key("a"))
    handover._report_deleted(keyspace.report_key(UID, "a"))
    written["revision"] = 41
    await flush_all(handover)
    assert fake.body["status"]["enforcement"] == "0/0 nodes"
    enforced = next(c for c in fake.body["status"]["conditions"] if c["type"] == "Enforced")
    assert enforced["reason"] == "Pending"
    handover.intent_mirror.revision = 41
    handover._mark_caught_up()
    await flush_all(handover)
    enforced = next(c for c in fake.body["status"]["conditions"] if c["type"] == "Enforced")
    assert (enforced["status"], enforced["reason"]) == ("True", "NoEndpoints")


async def test_stale_watch_event_does_not_regress_the_view() -> None:
    handover, fake = make(cnp())
    feed(handover, ["a"])
    await flush_all(handover)
    handover.observe_policy(cnp())  # resourceVersion 10 < 11 written
    await flush_all(handover)
    assert len(fake.patches) == 1


async def test_direct_writer_once_per_change() -> None:
    fake = FakeCustom(cnp())
    writer = DirectStatusWriter(None, "a")  # type: ignore[arg-type]
    writer.custom = fake  # type: ignore[assignment]
    assert await writer.write(report("a"))
    assert not await writer.write(report("a", at="2025-01-01T00:09:00Z"))  # lastUpdated only
    assert await writer.write(report("a", rev=6))
    assert fake.body["status"]["nodes"]["a"]["localPolicyRevision"] == 6
    assert await writer.remove(report("a"))
    assert fake.body["status"]["nodes"] == {}
    assert writer.writes == 3


async def test_direct_writer_keeps_the_entry_of_a_policy_created_again_under_its_name() -> None:
    """The policy deleted and created again (new uid) while the agent's reports move in one pass: the new
    report's write comes before the old one's removal (puts before deletes), and both patch by name. The
    removal must not wipe the new object's entry (seen in CI: ``.status.nodes`` stayed empty)."""
    fake = FakeCustom(cnp())
    writer = DirectStatusWriter(None, "a")  # type: ignore[arg-type]
    writer.custom = fake  # type: ignore[assignment]
    assert await writer.write(report("a"))
    fake.body = {**cnp(), "metadata": {**cnp()["metadata"], "uid": "u-2"}}  # deleted and created again
    again = report("a").model_copy(update={"policy_uid": "u-2"})
    assert await writer.write(again)
    assert await writer.remove(report("a"))  # the old uid's report is gone
    assert fake.body["status"]["nodes"]["a"]["enforcing"] is True
    assert await writer.remove(again)  # the new one's removal still goes
    assert fake.body["status"]["nodes"] == {}


async def test_policy_edit_costs_one_write_for_valid_and_enforced() -> None:
    handover, fake = make(cnp())
    handover.validated(UID, {"type": "Valid", "status": "True", "reason": "Validated", "message": "ok",
                             "observedGeneration": 1})
    feed(handover, ["a"])
    await flush_all(handover)
    assert len(fake.patches) == 1
    assert {c["type"]: c["status"] for c in fake.body["status"]["conditions"]} == {"Enforced": "True", "Valid": "True"}
    # the user edits the policy into one the operator refuses: one write says both
    fake.body["metadata"]["generation"] = 2
    handover.observe_policy(json.loads(json.dumps(fake.body)) | {"metadata": {
        **fake.body["metadata"], "resourceVersion": "99"}})
    handover.validated(UID, {"type": "Valid", "status": "False", "reason": "InvalidPolicy",
                             "message": "port 70000 is out of range", "observedGeneration": 2})
    await flush_all(handover)
    assert len(fake.patches) == 2 and "metadata" not in fake.patches[1]
    conds = {c["type"]: c for c in fake.body["status"]["conditions"]}
    assert conds["Valid"]["status"] == "False" and "70000" in conds["Valid"]["message"]
    assert (conds["Enforced"]["status"], conds["Enforced"]["reason"]) == ("False", "InvalidPolicy")
    # a forgotten policy takes its validity with it
    handover.forget_policy(UID)
    assert UID not in handover.valid


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _due(handover: StatusHandover, clock: Clock, until: float) -> None:
    """Drive the handover's loop by hand: flush whatever is due, 10 ms steps, up to ``until``."""
    while clock.now < until:
        due = handover.schedule.due(clock.now)
        if due:
            await handover.flush(due)
        clock.now = round(clock.now + 0.01, 2)


async def test_a_roll_out_costs_two_writes_and_a_slow_one_shows_progress() -> None:
    clock = Clock()
    nodes = [f"n{i}" for i in range(10)]
    handover, fake = make(cnp(), clock=clock, interval=1.0)
    feed(handover, nodes)
    await _due(handover, clock, 2.0)
    assert len(fake.patches) == 1 and fake.body["status"]["enforcement"] == "10/10 nodes"
    handover.intent_mirror.synced.set()
    # generation 2: "not yet" goes out at once; then nodes catch up one by one, every 0.3 s
    fake.body["metadata"].update(generation=2, resourceVersion="50")
    handover.observe_policy(json.loads(json.dumps(fake.body)))
    for node in nodes:
        handover._intent_put(keyspace.node_intent_key(node), intent(node, 7, gen=2))
    await _due(handover, clock, clock.now + 0.2)
    assert len(fake.patches) == 2 and fake.body["status"]["enforcement"] == "0/10 nodes"
    for node in nodes[:3]:  # quick: three nodes within 0.9 s ...
        handover._report_put(keyspace.report_key(UID, node), report(node, gen=2, rev=7).to_wire())
        await _due(handover, clock, clock.now + 0.3)
    assert len(fake.patches) == 2, "progress alone is held back"
    for node in nodes[3:]:  # ... the rest slowly, one every 0.9 s
        handover._report_put(keyspace.report_key(UID, node), report(node, gen=2, rev=7).to_wire())
        await _due(handover, clock, clock.now + 0.9)
    await _due(handover, clock, clock.now + 1.1)
    assert fake.body["status"]["enforcement"] == "10/10 nodes"
    enforced = next(c for c in fake.body["status"]["conditions"] if c["type"] == "Enforced")
    assert enforced["status"] == "True" and enforced["observedGeneration"] == 2
    # 7 s of roll-out: "not yet", one progress write after the 5 s progress interval, "done"
    assert len(fake.patches) == 4
    progress = fake.patches[2]["status"]["enforcement"]
    assert progress not in ("0/10 nodes", "10/10 nodes")


class FlakyCustom(FakeCustom):
    """The status subresource answering 504 to the first ``failures`` patches."""

    def __init__(self, body: dict[str, Any], failures: int) -> None:
        super().__init__(body)
        self.failures = failures

    async def patch_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> dict[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            from kubernetes_asyncio.client.rest import ApiException
            raise ApiException(status=504, reason="Gateway Timeout")
        return await super().patch_namespaced_custom_object_status(*args, **kw)


async def test_direct_writer_retries_a_failed_write_with_backoff() -> None:
    fake = FlakyCustom(cnp(), failures=2)
    writer = DirectStatusWriter(None, "a")  # type: ignore[arg-type]
    writer.custom = fake  # type: ignore[assignment]
    assert not await writer.write(report("a"))
    assert writer.failures == 1 and "504" in writer.last_error and UID in writer.pending
    t0 = writer._retry_at
    assert await writer.retry(now=t0 - 0.1) == 0  # backoff not over: nothing sent
    assert await writer.retry(now=t0) == 0  # second 504: backoff doubles
    assert writer._retry_at >= t0 + 2.0
    assert await writer.retry(now=writer._retry_at) == 1
    assert fake.body["status"]["nodes"]["a"]["localPolicyRevision"] == 5 and not writer.pending
    # a newer change replaces a pending one
    fake.failures = 1
    assert not await writer.remove(report("a"))
    assert writer.pending[UID][1] is True
    assert await writer.write(report("a", rev=7))
    assert not writer.pending and fake.body["status"]["nodes"]["a"]["localPolicyRevision"] == 7
