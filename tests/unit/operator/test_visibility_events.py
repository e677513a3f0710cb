"""Events about a pod's proxy-visibility annotation: what each case says, posted once per change."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from ciliary.operator.kube import handlers
from ciliary.operator.kube.cluster_model import ClusterModel


class _Observer:
    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: None


def pod(annotations: dict[str, str] | None = None, *, host_network: bool = False) -> dict[str, Any]:
    return {"metadata": {"namespace": "a", "name": "db", "uid": "u1", "labels": {"app": "db"},
                         "annotations": annotations or {}},
            "spec": {"nodeName": "n1", "hostNetwork": host_network},
            "status": {"podIP": "10.0.1.5", "phase": "Running"}}


def reasons(body: dict[str, Any]) -> list[tuple[bool, str]]:
    return [(n.warning, n.reason) for n in handlers.visibility_notices(body)]


def test_each_case_gets_its_event() -> None:
    assert handlers.visibility_notices(pod()) == ()
    (ok,) = handlers.visibility_notices(pod({"policy.cilium.io/proxy-visibility": "<Ingress/80/TCP/HTTP>"}))
    assert (ok.warning, ok.reason) == (False, "VisibilityEnabled") and "ingress TCP/80 HTTP" in ok.message
    (bad,) = handlers.visibility_notices(pod({"io.cilium.proxy-visibility": "<Ingress/80/UDP/HTTP>"}))
    assert (bad.warning, bad.reason) == (True, "VisibilityAnnotationInvalid")
    assert "HTTP runs on TCP" in bad.message and "not applied" in bad.message
    assert reasons(pod({"io.cilium.proxy-visibility": "<Ingress/80/TCP/HTTP>",
                        "policy.cilium.io/proxy-visibility": "<Ingress/80/TCP/HTTP>"})) == [
        (True, "VisibilityAnnotationIgnored"), (False, "VisibilityEnabled")]
    assert reasons(pod({"io.cilium.proxy-visibility": "<Ingress/80/TCP/HTTP>"}, host_network=True)) == [
        (True, "VisibilityNotApplied")]


def test_the_pod_handler_posts_on_change_only(monkeypatch: Any) -> None:
    posted: list[tuple[str, str, str, str]] = []

    def post(body: Any, *, type: str, reason: str, message: str) -> None:
        posted.append((type, body["kind"], body["metadata"]["name"], reason))

    monkeypatch.setattr(kopf, "event", post)
    registry = kopf.OperatorRegistry()
    model = ClusterModel()
    handlers.register(registry, model, _Observer())  # type: ignore[arg-type]
    (pod_event,) = [h.fn for h in registry._watching.get_all_handlers() if h.id == "pod_event"]
    bad = pod({"policy.cilium.io/proxy-visibility": "<Ingress/9092/TCP/Kafka>"})
    good = pod({"policy.cilium.io/proxy-visibility": "<Ingress/80/TCP/HTTP>"})
    for body in (bad, bad, good, good, pod(), bad):
        asyncio.run(pod_event(type="MODIFIED", body=body))
    assert posted == [("Warning", "Pod", "db", "VisibilityAnnotationInvalid"), ("Normal", "Pod", "db",
                                                                                 "VisibilityEnabled"),
                      ("Warning", "Pod", "db", "VisibilityAnnotationInvalid")]
    assert model.pods["u1"].visibility == ()
