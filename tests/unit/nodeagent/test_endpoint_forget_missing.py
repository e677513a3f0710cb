"""An endpoint whose host veth is gone (its pod deleted while the agent was down) is forgotten at start."""

from __future__ import annotations

from pathlib import Path

from ciliary.nodeagent import endpoints

BASE = {"podNamespace": "ns", "podUid": "u", "netns": "/run/netns/p", "ifname": "eth0",
        "mac": "aa:bb:cc:dd:ee:ff"}


def _endpoint(cid: str, veth: str, index: int, ip: str) -> endpoints.Endpoint:
    return endpoints.Endpoint.model_validate({**BASE, "containerId": cid, "podName": cid, "hostIfname": veth,
                                             "hostIfindex": index, "ipv4": ip})


async def test_forget_missing_removes_only_gone_veths_and_tells_listeners(tmp_path: Path) -> None:
    registry = endpoints.EndpointRegistry(tmp_path)
    removed: list[str] = []

    async def listener(event: endpoints.EndpointEvent) -> None:
        if event.kind is endpoints.EventKind.REMOVED:
            removed.append(event.endpoint.container_id)

    registry.subscribe(listener)
    await registry.upsert(_endpoint("alive", "cyaaa", 7, "10.244.1.5"))
    await registry.upsert(_endpoint("gone", "cybbb", 8, "10.244.1.6"))
    await registry.upsert(_endpoint("reused", "cyccc", 9, "10.244.1.7"))  # the name now has another ifindex
    links = {("cyaaa", 7), ("cyccc", 12)}
    gone = await registry.forget_missing(lambda e: (e.host_ifname, e.host_ifindex) in links)
    assert sorted(e.container_id for e in gone) == ["gone", "reused"] == sorted(removed)
    assert [e.container_id for e in registry.list()] == ["alive"]
    reloaded = endpoints.EndpointRegistry(tmp_path)
    reloaded.load()
    assert [e.container_id for e in reloaded.list()] == ["alive"]  # persisted
