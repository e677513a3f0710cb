"""dns_service.DNSService with a recording enforcer: what it hands over, when, and what it reports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_fqdn_cache import POD, node_intent  # type: ignore[import-not-found]

from ciliary.nodeagent import dns_service, endpoints, settings
from ciliary.nodeagent.enforcing import Outcome
from ciliary.operator import intents


class RecordingEnforcer:
    def __init__(self, registry: endpoints.EndpointRegistry) -> None:
        self.registry = registry
        self.calls: list[tuple[str, intents.NodeIntent]] = []
        self.waited: list[int] = []
        self.problems: dict[str, str] = {}
        self.outcome = Outcome()
        self.started = asyncio.Event()

    def set_intent(self, intent: intents.NodeIntent) -> int:
        self.calls.append(("set", intent))
        return len(self.calls)

    def refresh_intent(self, intent: intents.NodeIntent) -> int:
        self.calls.append(("refresh", intent))
        return len(self.calls)

    async def wait_applied(self, request: int, timeout: float) -> bool:
        self.waited.append(request)
        return True

    def set_proxy_problems(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)


def make(tmp_path: Path, *extra: str) -> tuple[dns_service.DNSService, RecordingEnforcer]:
    env: dict[str, str] = {"CILIARY_AGENT_NODE_NAME": "n1"}
    for name in ("CA", "CERT", "KEY"):
        path = tmp_path / f"{name.lower()}.pem"
        path.write_text("x")
        env[f"CILIARY_AGENT_ETCD_{name}_FILE"] = str(path)
    config = settings.load_settings(["--fqdn-min-ttl", "0", *extra], env)
    enforcer = RecordingEnforcer(endpoints.EndpointRegistry(tmp_path))
    return dns_service.DNSService(config, enforcer, lambda _events: None), enforcer  # type: ignore[arg-type]


async def test_learning_hands_over_the_expanded_intent_and_waits_for_it(tmp_path: Path) -> None:
    service, enforcer = make(tmp_path)
    base = node_intent()
    service.on_intent(base)
    assert enforcer.calls == [("set", base)]  # nothing learnt: the operator's intent as it is
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 30)])
    kind, expanded = enforcer.calls[-1]
    assert kind == "refresh" and enforcer.waited == [2]
    assert any(e.cidr == "192.0.2.100/32" for e in expanded.ipcache)
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 60)])  # nothing new granted
    assert len(enforcer.calls) == 2
    await service._learn(POD, ["www.world.test"], [("192.0.2.101", 60)])  # matches no selector
    assert len(enforcer.calls) == 2
    service.cache.expire(float("inf"))
    assert service._apply() is not None and enforcer.calls[-1] == ("refresh", base)
    assert service.proxy_ports == {"dns": 10053}


async def test_an_answer_already_learnt_costs_no_grants_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service, enforcer = make(tmp_path)
    service.on_intent(node_intent())
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 30)])
    passes: list[int] = []
    real = dns_service.fqdn_expansion.grants
    monkeypatch.setattr(dns_service.fqdn_expansion, "grants", lambda *a: passes.append(1) or real(*a))
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 60)])  # a later expiry only
    assert passes == [] and len(enforcer.calls) == 2
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 60), ("192.0.2.102", 60)])  # a new address
    assert passes and len(enforcer.calls) == 3 and enforcer.waited == [2, 3]
    assert any(e.cidr == "192.0.2.102/32" for e in enforcer.calls[-1][1].ipcache)


@pytest.mark.parametrize(("flags", "expected"), [
    (("--dns-proxy-port", "0"), "no DNS proxy on this node"),
    ((), "DNS proxy not running"),
])
def test_problems_are_reported_until_the_proxy_can_enforce(tmp_path: Path, flags: tuple[str, ...],
                                                             expected: str) -> None:
    service, enforcer = make(tmp_path, *flags)
    assert enforcer.problems["dns"].startswith(expected)
    if flags:
        assert service.proxy_ports == {}


def test_routing_problems_are_named(tmp_path: Path) -> None:
    service, _enforcer = make(tmp_path)
    service.proxy.running = True
    service.routing_problems = ["no ip rule fwmark 0xa00/0xf00 lookup 2005"]
    assert "proxy redirection not in place: no ip rule" in service.problem()
    service.routing_problems = []
    assert service.problem() == ""
    view: dict[str, Any] = service.view()
    assert view["port"] == 10053 and view["problem"] == "" and view["learnt"] == []


def pod(container: str, ifindex: int) -> endpoints.Endpoint:
    return endpoints.Endpoint(container_id=container, netns=f"/run/netns/{container}", ifname="eth0",
                              host_ifname=f"cy{ifindex}", host_ifindex=ifindex, mac="02:00:00:00:00:01", ipv4=POD)


async def test_a_new_pod_with_the_address_does_not_inherit_what_the_old_one_resolved(tmp_path: Path) -> None:
    """The new pod's veth shows up before the old pod's removal: the old pod's learnt addresses are dropped
    (and the intent handed over again without them) before the enforcer hears of the new veth."""
    service, enforcer = make(tmp_path)
    registry = enforcer.registry
    registry.subscribe(service.on_endpoint_event)
    base = node_intent()
    service.on_intent(base)
    await registry.upsert(pod("old", 7))
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 300)])
    assert any(e.cidr == "192.0.2.100/32" for e in enforcer.calls[-1][1].ipcache)
    await registry.upsert(pod("old", 7).model_copy(update={"pod_name": "same-veth"}))  # same pod, same veth
    assert service.cache.names_by_address()
    calls = len(enforcer.calls)
    await registry.upsert(pod("new", 9))  # the address on another veth, the old pod still registered
    assert not service.cache.names_by_address()
    assert len(enforcer.calls) == calls + 1 and enforcer.calls[-1] == ("refresh", base)
    # the new pod resolves; the old pod's late removal does not take the new pod's answers away
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 300)])
    await registry.remove("old")
    assert service.cache.names_by_address()
    # the new pod goes: its answers go with it
    await registry.remove("new")
    assert not service.cache.names_by_address()


async def test_answers_learnt_for_an_address_then_behind_another_veth_start_afresh(tmp_path: Path) -> None:
    """No registry event in between (events are processed in order, but the proxy may answer first)."""
    service, enforcer = make(tmp_path)
    service.on_intent(node_intent())
    await enforcer.registry.upsert(pod("old", 7))
    await service._learn(POD, ["api.world.test"], [("192.0.2.100", 300)])
    await enforcer.registry.remove("old")  # not subscribed: the service does not hear of it
    await enforcer.registry.upsert(pod("new", 9))
    await service._learn(POD, ["www.world.test"], [("192.0.2.101", 300)])
    assert [a for names in service.cache.names_by_address().values() for a in names] == ["192.0.2.101"]
