"""Endpoint registry: idempotent upsert, removal, persistence, listeners and rollback."""

import json

import pytest

from ciliary.nodeagent import endpoints


def ep(cid="c1", ip="10.244.1.5", **over):
    body = {"containerId": cid, "podNamespace": "ns", "podName": "web", "podUid": "u", "netns": "/run/netns/p",
            "ifname": "eth0", "hostIfname": "cyabc", "hostIfindex": 7, "mac": "aa:bb:cc:dd:ee:ff", "ipv4": ip}
    body.update(over)
    return endpoints.Endpoint.model_validate(body)


async def test_upsert_is_idempotent_and_persisted(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    assert await registry.upsert(ep()) is True
    assert await registry.upsert(ep()) is False
    assert await registry.upsert(ep(ip="10.244.1.6")) is True
    assert len(registry) == 1
    doc = json.loads((tmp_path / endpoints.STATE_FILE).read_text())
    assert doc["version"] == 1
    assert doc["endpoints"][0]["ipv4"] == "10.244.1.6"
    assert doc["endpoints"][0]["containerId"] == "c1"


async def test_reload_restores_endpoints(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    await registry.upsert(ep("c1"))
    await registry.upsert(ep("c2", "10.244.1.9"))
    await registry.remove("c1")
    again = endpoints.EndpointRegistry(tmp_path)
    again.load()
    assert [e.container_id for e in again.list()] == ["c2"]
    assert again.get("c2") == ep("c2", "10.244.1.9")


async def test_remove_unknown_is_fine(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    assert await registry.remove("nope") is None


async def test_corrupt_state_is_set_aside(tmp_path):
    (tmp_path / endpoints.STATE_FILE).write_text("{broken")
    registry = endpoints.EndpointRegistry(tmp_path)
    registry.load()
    assert len(registry) == 0
    assert (tmp_path / "endpoints.corrupt").exists()


async def test_listeners_hear_adds_and_removes(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    seen = []

    async def listener(event):
        seen.append((event.kind, event.endpoint.container_id))

    registry.subscribe(listener)
    await registry.upsert(ep())
    await registry.upsert(ep())  # unchanged: no event
    await registry.remove("c1")
    assert seen == [(endpoints.EventKind.ADDED, "c1"), (endpoints.EventKind.REMOVED, "c1")]


async def test_failing_listener_rolls_back_the_add(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)

    async def refuse(event):
        raise RuntimeError("no datapath")

    registry.subscribe(refuse)
    with pytest.raises(endpoints.EndpointHookError):
        await registry.upsert(ep())
    assert len(registry) == 0
    assert json.loads((tmp_path / endpoints.STATE_FILE).read_text())["endpoints"] == []


async def test_failing_listener_cannot_block_a_remove(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    await registry.upsert(ep())

    async def boom(event):
        raise RuntimeError("x")

    registry.subscribe(boom)
    removed = await registry.remove("c1")
    assert removed is not None and removed.container_id == "c1"
    assert len(registry) == 0


def test_model_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError):
        ep(extra="x")
    with pytest.raises(ValueError):
        ep(mac="nope")
    with pytest.raises(ValueError):
        ep(containerId="a/b")
