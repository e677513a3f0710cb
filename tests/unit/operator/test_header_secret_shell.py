"""Header values from Secrets in the operator's shell: read once, then followed by the watch (rotation reaches the
intents), deletion fails closed, problems reach the status and one Warning Event ``HeaderSecretProblem``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent / "policy"))  # test_policy_resolution's tables

from test_handover_shell import UID, cnp, feed, make
from test_policy_resolution import DB, WEB, state_of  # type: ignore[import-not-found]
from test_policy_resolution import cnp as policy_body

from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.policy.resolution import resolve_cluster
from ciliary.operator.reconciling import Reconciler
from ciliary.operator.status.tls_events import HEADER_REASON, REASON, TlsProblemReporter, event_of

SPEC = {"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [{
    "ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [
        {"path": "/private", "headerMatches": [{"name": "Access-Token", "secret": {"name": "tok"}}]}]}}]}]}


def test_the_secret_is_read_once_rotated_by_the_watch_and_its_deletion_fails_closed() -> None:
    model = ClusterModel()
    fetched: list[tuple[str, str]] = []
    reported: list[dict[str, str]] = []

    async def fetch(namespace: str, name: str) -> Any:
        fetched.append((namespace, name))
        return {"token": b"v1"}

    async def report(problems: Any) -> None:
        reported.append(dict(problems))

    reconciler = Reconciler(model, None, None, fetch_secret=fetch, report_tls=report)  # type: ignore[arg-type]
    resolved = resolve_cluster(state_of(policy_body(SPEC)))
    out = asyncio.run(reconciler.with_tls(resolved))
    assert fetched == [("a", "tok")] and reported == [{}] and model.wanted_secrets == {("a", "tok")}
    assert out["n2"].header_secrets["a/tok"].value == "v1" and out["n1"] is resolved["n1"]
    model.set_secret(("a", "tok"), {"token": b"v2"})
    again = asyncio.run(reconciler.with_tls(resolved))
    assert fetched == [("a", "tok")] and again["n2"].header_secrets["a/tok"].value == "v2"
    model.set_secret(("a", "tok"), None)
    failed = asyncio.run(reconciler.with_tls(resolved))
    entry = next(e for e in failed["n2"].endpoints if e.pod == "db").ingress.entries
    assert [e.http for e in entry if e.port_low == 80] == [None] and failed["n2"].header_secrets == {}
    assert reported[-1] == {"uid-a-p": "headerMatches Secret a/tok: not found: the port's connections are dropped"}


class FakeCore:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def create_namespaced_event(self, namespace: str, event: dict[str, Any], **_: Any) -> None:
        self.events.append(event)


def test_events_say_which_kind_of_secret() -> None:
    header = "headerMatches Secret ns/tok: not found: the port's connections are dropped"
    tls = "terminatingTLS Secret ns/absent: not found"
    assert event_of(header)[0] == HEADER_REASON and event_of(tls)[0] == REASON
    assert event_of(f"{header}; {tls}")[0] == REASON
    asyncio.run(_problem_reaches_the_status(header))


async def _problem_reaches_the_status(message: str) -> None:
    handover, _ = make(cnp())
    handover.assessed(UID, 1, "")
    feed(handover, ["n1"])
    reporter = TlsProblemReporter.__new__(TlsProblemReporter)
    reporter.handover, reporter.core, reporter.said = handover, FakeCore(), set()  # type: ignore[assignment]
    await reporter({UID: message})
    await reporter({UID: message})
    enforced = handover.desired(UID).enforced
    assert enforced["status"] == "False" and message in enforced["message"], enforced
    events = reporter.core.events  # type: ignore[attr-defined]
    assert len(events) == 1 and events[0]["reason"] == HEADER_REASON and events[0]["type"] == "Warning"
    assert "ns/tok" in json.dumps(events)
