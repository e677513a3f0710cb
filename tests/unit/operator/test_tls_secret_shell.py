"""TLS Secrets in the operator's shell: only the Secrets intents name are read and held, rotation reaches the
intents, problems reach the status and one Warning Event (fake API; no apiserver, no etcd)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "policy"))  # test_policy_resolution's tables

from test_handover_shell import UID, cnp, feed, make
from test_policy_resolution import WEB, state_of  # type: ignore[import-not-found]
from test_policy_resolution import cnp as policy_body

from ciliary.lab.testca import TestCA
from ciliary.operator.kube.cluster_model import ClusterModel, secret_from_body
from ciliary.operator.policy.resolution import resolve_cluster
from ciliary.operator.reconciling import Reconciler
from ciliary.operator.status.tls_events import REASON, TlsProblemReporter

CA = TestCA("shell-ca")
CERT, KEY = CA.issue("api.world.test")
SPEC = {"endpointSelector": WEB, "egress": [{"toCIDR": ["192.0.2.100/32"], "toPorts": [{
    "ports": [{"port": "443", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]},
    "terminatingTLS": {"secret": {"name": "intercept"}}, "originatingTLS": {"secret": {"name": "world-ca"}}}]}]}


def body(items: dict[str, str]) -> dict[str, Any]:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in items.items()}}


def test_only_named_secrets_are_read_held_and_rotated_into_the_intents() -> None:
    model = ClusterModel()
    fetched: list[tuple[str, str]] = []
    reported: list[dict[str, str]] = []
    store = {("a", "intercept"): secret_from_body(body({"tls.crt": CERT, "tls.key": KEY})),
             ("a", "world-ca"): secret_from_body(body({"ca.crt": CA.cert_pem}))}

    async def fetch(namespace: str, name: str) -> Any:
        fetched.append((namespace, name))
        return store.get((namespace, name))

    async def report(problems: Any) -> None:
        reported.append(dict(problems))

    reconciler = Reconciler(model, None, None, fetch_secret=fetch, report_tls=report)  # type: ignore[arg-type]
    intents = resolve_cluster(state_of(policy_body(SPEC)))
    out = asyncio.run(reconciler.with_tls(intents))
    assert sorted(fetched) == [("a", "intercept"), ("a", "world-ca")] and reported == [{}]
    assert set(out["n1"].tls_secrets) == {"a/intercept", "a/world-ca"} and out["n2"].tls_secrets == {}
    assert out["n2"] is intents["n2"]  # untouched: no TLS context there
    # a Secret no intent names is dropped unread; a named one's change is held and marks the model dirty
    model.dirty.clear()
    model.set_secret(("a", "unrelated"), {"x": b"y"})
    assert ("a", "unrelated") not in model.secrets and not model.dirty.is_set()
    cert2, key2 = CA.issue("api.world.test")
    model.set_secret(("a", "intercept"), secret_from_body(body({"tls.crt": cert2, "tls.key": key2})))
    assert model.dirty.is_set()
    again = asyncio.run(reconciler.with_tls(intents))
    assert len(fetched) == 2  # read once; later changes come from the watch
    assert again["n1"].tls_secrets["a/intercept"].private_key == key2
    assert again["n1"].content_hash() != out["n1"].content_hash()
    # deleted: fail closed, problem reported for the policy
    model.set_secret(("a", "intercept"), None)
    failed = asyncio.run(reconciler.with_tls(intents))
    assert failed["n1"].tls_secrets == {}
    assert list(reported[-1]) == ["uid-a-p"] and "a/intercept: not found" in reported[-1]["uid-a-p"]
    # no policy names them any more: forgotten
    asyncio.run(reconciler.with_tls(resolve_cluster(state_of())))
    assert model.secrets == {} and model.wanted_secrets == set()


class FakeCore:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def create_namespaced_event(self, namespace: str, event: dict[str, Any], **_: Any) -> None:
        self.events.append(event)


def test_problems_reach_the_enforced_condition_and_one_warning_event() -> None:
    asyncio.run(_problems_reach_the_status())


async def _problems_reach_the_status() -> None:
    handover, _ = make(cnp())
    handover.assessed(UID, 1, "")
    feed(handover, ["n1"])
    assert handover.desired(UID).enforced["status"] == "True"
    reporter = TlsProblemReporter.__new__(TlsProblemReporter)
    reporter.handover, reporter.core, reporter.said = handover, FakeCore(), set()  # type: ignore[assignment]
    message = "terminatingTLS Secret ns/absent: not found"
    await reporter({UID: message})
    await reporter({UID: message})
    enforced = handover.desired(UID).enforced
    assert enforced["status"] == "False" and message in enforced["message"], enforced
    events = reporter.core.events  # type: ignore[attr-defined]
    assert len(events) == 1 and events[0]["reason"] == REASON and events[0]["type"] == "Warning"
    assert "ns/absent" in events[0]["message"] and "BEGIN" not in json.dumps(events)
    await reporter({})
    assert handover.desired(UID).enforced["status"] == "True"


class FakeResponse:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body, self.released = status, body, False

    async def read(self) -> bytes:
        return json.dumps(self.body).encode()

    def release(self) -> None:
        self.released = True


def test_the_secret_reader_decodes_items_and_tells_missing_from_refused(monkeypatch: Any) -> None:
    """A raw (not preloaded) read raises nothing for an error status: 404 must read as missing, 403 as an error."""
    from kubernetes_asyncio.client.exceptions import ApiException

    from ciliary.operator.kube import kubeapi

    answers = {"there": FakeResponse(200, {"kind": "Secret", **body({"ca.crt": CA.cert_pem})}),
               "gone": FakeResponse(404, {"kind": "Status", "reason": "NotFound"}),
               "forbidden": FakeResponse(403, {"kind": "Status", "reason": "Forbidden"})}

    class FakeCoreApi:
        def __init__(self, api: Any) -> None:
            pass

        async def read_namespaced_secret(self, name: str, namespace: str, **kw: Any) -> FakeResponse:
            assert kw["_preload_content"] is False
            return answers[name]

    monkeypatch.setattr(kubeapi.client, "CoreV1Api", FakeCoreApi)
    read = kubeapi.secret_reader(None)  # type: ignore[arg-type]
    assert asyncio.run(read("ns", "there")) == {"ca.crt": CA.cert_pem.encode()}
    assert asyncio.run(read("ns", "gone")) is None
    with pytest.raises(ApiException) as refused:
        asyncio.run(read("ns", "forbidden"))
    assert refused.value.status == 403
    assert all(r.released for r in answers.values())
