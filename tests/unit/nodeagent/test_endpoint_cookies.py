"""A pod registered without its network-namespace cookie (by an older CNI plugin) gets it when the agent starts:
read from its namespace file (where the chart mounts the runtime's directory), persisted, never guessed. The
read itself (``setns``, root) is tested in tests/integration/agent/test_pod_netns_cookie.py."""

from __future__ import annotations

from pathlib import Path

from ciliary.nodeagent import endpoints

BASE = {"podNamespace": "ns", "podUid": "u", "ifname": "eth0", "mac": "aa:bb:cc:dd:ee:ff"}


def _endpoint(cid: str, index: int, ip: str, netns: str, cookie: int = 0) -> endpoints.Endpoint:
    return endpoints.Endpoint.model_validate({**BASE, "containerId": cid, "podName": cid, "hostIfname": f"cy{cid}",
                                              "hostIfindex": index, "ipv4": ip, "netns": netns,
                                              "netnsCookie": cookie})


def test_the_namespace_is_opened_by_its_name_in_the_mounted_directory() -> None:
    cni = "/run/nodes/node-1/containerd/io.containerd.grpc.v1.cri/netns/cni-1234"
    assert endpoints.pod_netns_path(cni, Path("/host/netns")) == "/host/netns/cni-1234"
    assert endpoints.pod_netns_path(cni, None) == cni
    # a process's namespace has no file of its own in the runtime's directory: its path as given
    assert endpoints.pod_netns_path("/proc/4242/ns/net", Path("/host/netns")) == "/proc/4242/ns/net"


async def test_unknown_cookies_are_learnt_and_persisted_known_ones_kept(tmp_path: Path) -> None:
    registry = endpoints.EndpointRegistry(tmp_path)
    await registry.upsert(_endpoint("old", 7, "10.244.1.5", "/run/netns/cni-old"))
    await registry.upsert(_endpoint("new", 8, "10.244.1.6", "/run/netns/cni-new", cookie=41))
    await registry.upsert(_endpoint("gone", 9, "10.244.1.7", "/run/netns/cni-gone"))
    read: list[str] = []

    def cookie_of(endpoint: endpoints.Endpoint) -> int:
        read.append(endpoint.container_id)
        if endpoint.container_id == "gone":
            raise FileNotFoundError(2, "No such file or directory", endpoint.netns)
        return 4242

    learnt = registry.learn_cookies(cookie_of)
    assert [e.container_id for e in learnt] == ["old"] and sorted(read) == ["gone", "old"]  # "new" not read again
    cookies = {e.container_id: e.netns_cookie for e in registry.list()}
    assert cookies == {"gone": 0, "new": 41, "old": 4242}  # an unreadable namespace stays unknown
    reloaded = endpoints.EndpointRegistry(tmp_path)
    reloaded.load()
    assert {e.container_id: e.netns_cookie for e in reloaded.list()} == cookies
    assert registry.learn_cookies(lambda e: 0) == []  # a zero read is no cookie
