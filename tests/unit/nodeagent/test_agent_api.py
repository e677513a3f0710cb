"""Endpoint API and health handlers through aiohttp's in-process test client."""

import os
import stat
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ciliary.nodeagent import endpoint_api, endpoints, health

BODY = {"containerId": "c1", "podNamespace": "ns", "podName": "web", "podUid": "u", "netns": "/run/netns/p",
        "ifname": "eth0", "hostIfname": "cyabc", "hostIfindex": 7, "mac": "aa:bb:cc:dd:ee:ff", "ipv4": "10.244.1.5",
        "netnsCookie": 4242}


@pytest.fixture
async def api(tmp_path):
    registry = endpoints.EndpointRegistry(tmp_path)
    async with TestClient(TestServer(endpoint_api.build_app(registry))) as client:
        yield client, registry


async def test_post_list_delete(api):
    client, registry = api
    r = await client.post("/v1/endpoints", json=BODY)
    assert r.status == 201
    assert (await r.json())["created"] is True
    r = await client.post("/v1/endpoints", json=BODY)
    assert r.status == 200
    assert (await r.json())["created"] is False
    r = await client.get("/v1/endpoints")
    assert (await r.json())["endpoints"] == [BODY]
    r = await client.delete("/v1/endpoints/c1")
    assert (r.status, await r.json()) == (200, {"removed": True})
    r = await client.delete("/v1/endpoints/c1")
    assert (r.status, await r.json()) == (200, {"removed": False})
    assert len(registry) == 0


async def test_invalid_bodies(api):
    client, _ = api
    r = await client.post("/v1/endpoints", data=b"{x", headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/v1/endpoints", json={**BODY, "ipv4": "nope"})
    assert r.status == 422
    assert (await r.json())["error"] == "Invalid endpoint"


async def test_hook_failure_is_500_and_rolled_back(api):
    client, registry = api

    async def refuse(event):
        raise RuntimeError("no datapath")

    registry.subscribe(refuse)
    r = await client.post("/v1/endpoints", json=BODY)
    assert r.status == 500
    assert len(registry) == 0


async def test_unix_socket_server_replaces_stale_socket_with_0600(tmp_path):
    import socket

    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    runner = await endpoint_api.start(endpoints.EndpointRegistry(tmp_path), path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            async with session.post("http://agent/v1/endpoints", json=BODY) as r:
                assert r.status == 201
    finally:
        await runner.cleanup()


async def test_refuses_to_delete_a_non_socket(tmp_path):
    path = tmp_path / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        endpoint_api.remove_stale_socket(path)


@dataclass
class FakeRegistration:
    etcd_connected: bool
    registered: bool


async def test_health_and_readiness():
    reg = FakeRegistration(etcd_connected=False, registered=False)
    sources = health.HealthSources("node-1", reg, [1, 2])
    async with TestClient(TestServer(health.build_app(sources))) as client:
        r = await client.get("/healthz")
        assert (r.status, await r.json()) == (
            200, {"node": "node-1", "status": "ok", "etcd": "disconnected", "endpoints": 2, "problems": []})
        assert (await client.get("/readyz")).status == 503
        reg.etcd_connected = reg.registered = True
        assert (await (await client.get("/healthz")).json())["etcd"] == "connected"
        assert (await client.get("/readyz")).status == 200


async def test_datapath_off_refuses_every_endpoint(tmp_path):
    """--datapath off: the agent enforces nothing, so it takes no endpoint (the CNI ADD fails, code 105)."""
    from ciliary.cni import agent_client

    registry = endpoints.EndpointRegistry(tmp_path)
    async with TestClient(TestServer(endpoint_api.build_app(registry, enforcing=False))) as client:
        r = await client.post("/v1/endpoints", json=BODY)
        assert r.status == 503
        assert (await r.json())["error"] == endpoint_api.DATAPATH_OFF == agent_client.DATAPATH_OFF
        assert len(registry) == 0
        r = await client.get("/v1/endpoints")
        assert (await r.json())["endpoints"] == []


HEALTHY = health.EnforcementView(datapath=True, started=True, watch_synced=True, wanted_revision=4,
                                 applied_revision=4)


@pytest.mark.parametrize(("changes", "live", "ready"), [
    ({}, [], []),
    ({"wanted_revision": None, "applied_revision": None}, [], []),  # no intent for this node: nothing to apply
    ({"datapath": False}, [], ["datapath off: this agent enforces nothing"]),
    ({"started": False}, [], ["datapath not loaded"]),  # still compiling: alive, not ready
    ({"started": False, "start_error": "clang failed"}, ["datapath did not start: clang failed"],
     ["datapath not loaded: clang failed"]),
    ({"datapath_problems": ("map pin cy_policy is gone",)}, ["datapath: map pin cy_policy is gone"],
     ["datapath: map pin cy_policy is gone"]),
    ({"watch_synced": False}, [], ["intent not read yet"]),
    ({"watch_broken_for": 3.0}, [], ["intent watch broken"]),  # a blip: alive, not ready
    ({"watch_broken_for": 30.0}, ["intent watch broken for 30 s"], ["intent watch broken"]),
    ({"wanted_revision": 5}, [], ["intent revision 5 not applied (applied: 4)"]),
    ({"apply_error": "map cy_policy needs 70000 entries"}, [],
     ["newest intent not applied: map cy_policy needs 70000 entries"]),
    ({"lb_not_started": "not attached yet"}, [], ["socket load balancer: not attached yet"]),
])
def test_liveness_and_readiness_reasons(changes, live, ready):
    import dataclasses

    view = dataclasses.replace(HEALTHY, **changes)
    assert health.liveness_problems(view) == live
    assert health.readiness_problems(view) == ready


async def test_health_endpoints_fail_with_their_reasons():
    reg = FakeRegistration(etcd_connected=True, registered=True)
    state = {"view": HEALTHY}
    sources = health.HealthSources("node-1", reg, [], enforcement=lambda: state["view"])
    async with TestClient(TestServer(health.build_app(sources))) as client:
        assert (await client.get("/healthz")).status == 200 and (await client.get("/readyz")).status == 200
        import dataclasses

        state["view"] = dataclasses.replace(HEALTHY, datapath_problems=("cy_to_pod is not attached to cy1",))
        r = await client.get("/healthz")
        assert r.status == 503 and (await r.json())["problems"] == ["datapath: cy_to_pod is not attached to cy1"]
        r = await client.get("/readyz")
        assert r.status == 503 and (await r.json())["ready"] is False
