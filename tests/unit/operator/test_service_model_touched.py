"""``ServiceModel.take_touched``: every key whose Service or slice value was set or deleted since the last call
(the LB pass looks only at those), and no key whose value stayed as it was."""

from __future__ import annotations

from typing import Any

from ciliary.operator.kube.service_model import ServiceModel
from ciliary.operator.services import sharding
from ciliary.operator.services.incremental_resolution import IncrementalResolver
from ciliary.operator.services.resolution import resolve

NODES = {"n1": "192.0.2.11", "n2": "192.0.2.12"}


def service(name: str, port: int = 80) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "type": "ClusterIP",
                     "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}}


def endpoint_slice(name: str, service_name: str, ip: str = "10.244.0.1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def endpoints(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]}


def test_the_keys_set_or_deleted_since_the_last_take_and_only_those() -> None:
    model = ServiceModel()
    model.set_service(service("a"))
    model.set_service(service("b"))
    model.set_slice(endpoint_slice("a-1", "a"))
    assert model.take_touched() == ({"ns/a", "ns/b"}, {"ns/a-1"})
    assert model.take_touched() == (set(), set())
    model.set_service(service("a"))  # the same Service again: nothing changed
    model.set_slice(endpoint_slice("a-1", "a"))
    assert model.take_touched() == (set(), set())
    model.set_service(service("a", port=81))
    model.set_service(service("b"), deleted=True)
    model.set_slice(endpoint_slice("a-1", "b"))  # the slice moves to another Service
    model.set_slice(endpoint_slice("a-2", "a"), deleted=True)  # never seen: nothing to delete
    assert model.take_touched() == ({"ns/a", "ns/b"}, {"ns/a-1"})
    model.set_slice(endpoint_slice("a-1", "b"), deleted=True)
    assert model.take_touched() == (set(), {"ns/a-1"})


def test_endpoints_objects_touch_the_slice_values_they_replace() -> None:
    model = ServiceModel()
    model.set_endpoints(endpoints("a", "10.244.0.1"))
    first = model.take_touched()
    assert first.services == set() and first.slices and first.slices == set(model.slices)
    model.set_endpoints(endpoints("a", "10.244.0.2"))
    assert model.take_touched().slices == set(model.slices)
    model.set_endpoints(endpoints("a", "10.244.0.2"), deleted=True)
    assert model.take_touched().slices == first.slices and not model.slices


def test_a_resolver_told_the_models_touched_keys_follows_the_model() -> None:
    """Bodies into the model, its touched keys to the resolver: each pass equals a resolution from scratch."""
    model = ServiceModel()
    resolver = IncrementalResolver()
    steps = [
        lambda: (model.set_service(service("a")), model.set_service(service("b")),
                 model.set_slice(endpoint_slice("a-1", "a"))),
        lambda: model.set_slice(endpoint_slice("a-1", "b")),  # the slice moves to b
        lambda: (model.set_service(service("a", port=81)), model.set_slice(endpoint_slice("b-2", "b", "10.244.0.9"))),
        lambda: model.set_service(service("b"), deleted=True),
        lambda: model.set_slice(endpoint_slice("a-1", "b"), deleted=True),
        lambda: None,
    ]
    for step in steps:
        step()
        got = resolver.update(model.services, model.slices, NODES, model.take_touched())
        fresh = resolve(model.services, model.slices, NODES)
        assert {n: dict(b) for n, b in got.shards.items()} == {
            n: sharding.bodies_of(intent) for n, intent in fresh.intents.items()}
        assert dict(got.problems) == dict(fresh.problems)
