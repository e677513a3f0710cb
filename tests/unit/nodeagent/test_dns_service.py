"""dns_service.DNSService with a recording enforcer: what it hands over, when, and what it reports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_fqdn_cache import POD, node_intent  # type: ignore[import-not-found]

from ciliary.nodeagent import dns_service, settings
from ciliary.nodeagent.enforcing import Outcome
from ciliary.operator import intents


class RecordingEnforcer:
    def __init__(self) -> None:
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
    enforcer = RecordingEnforcer()
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
