"""Every watch-event handler the operator registers runs on the event loop (``async``).

kopf runs a sync handler in a worker thread; the models those handlers change (``ClusterModel``,
``ServiceModel``) are iterated by the reconcile loops on the event loop, so a sync handler races them
("dictionary changed size during iteration" at 5,000 Services, the event lost).
"""

from __future__ import annotations

import inspect
from typing import Any

import kopf

from ciliary.operator.kube import handlers, service_handlers
from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.kube.service_model import ServiceModel


class _Observer:
    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: None


def _event_handlers(registry: kopf.OperatorRegistry) -> list[Any]:
    return list(registry._watching.get_all_handlers())


def test_every_watch_handler_is_async() -> None:
    for endpoints_api in service_handlers.ENDPOINT_APIS:
        registry = kopf.OperatorRegistry()
        service_handlers.register(registry, ServiceModel(), endpoints_api)
        found = _event_handlers(registry)
        assert len(found) == 2
        assert all(inspect.iscoroutinefunction(h.fn) for h in found), [h.id for h in found]
    registry = kopf.OperatorRegistry()
    handlers.register(registry, ClusterModel(), _Observer())  # type: ignore[arg-type]
    found = _event_handlers(registry)
    assert {h.id for h in found} >= {"pod_event", "namespace_event", "node_event"}
    assert all(inspect.iscoroutinefunction(h.fn) for h in found), [h.id for h in found if
                                                                    not inspect.iscoroutinefunction(h.fn)]
