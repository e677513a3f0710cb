"""dns_proxy.DNSProxy.handle over loopback: refusal, forwarding, learning before release, bounded timeouts."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import dns.message
import dns.rcode

from ciliary.lab import worlddns
from ciliary.nodeagent.dns_policy import QueryVerdict
from ciliary.nodeagent.dns_proxy import DNSProxy
from ciliary.nodeagent.dns_wire import answer_addresses
from ciliary.nodeagent.netns_sockets import NetnsSockets
from ciliary.operator.intents import DNSRule, PolicyEntry, Protocol, RuleRef, Verdict

RULE = RuleRef(kind="CiliumNetworkPolicy", namespace="ns", name="dns", uid="u", rule_index=0, section="egress[0]")
ENTRY = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                    l7_parser="dns", dns=(DNSRule(match_pattern="*.world.test"),), rules=(RULE,))


def verdict(_client: str, _server: str, _port: int, _proto: int) -> QueryVerdict:
    return QueryVerdict(None, ENTRY.dns, (ENTRY,), peer=2)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(name: str) -> bytes:
    return dns.message.make_query(name, "A").to_wire()


async def test_refuses_forwards_and_learns_before_releasing() -> None:
    port = free_udp_port()
    server = asyncio.create_task(worlddns.serve("127.0.0.1", port))
    flows: list[Any] = []
    learnt: list[tuple[str, list[str], list[tuple[str, int]]]] = []

    async def learn(client: str, names: list[str], answers: list[tuple[str, int]]) -> None:
        await asyncio.sleep(0.05)  # the datapath apply
        learnt.append((client, names, answers))

    proxy = DNSProxy(sockets=NetnsSockets(None), port=0, verdict=verdict, learn=learn, publish=flows.extend,
                     timeout=1.0)
    try:
        await asyncio.sleep(0.2)
        refused = await proxy.handle(query("mirror.example.test"), ("10.0.0.2", 5000), ("127.0.0.1", port), 17)
        assert refused is not None and dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
        assert not learnt  # never forwarded
        raw = await proxy.handle(query("alias.world.test"), ("10.0.0.2", 5000), ("127.0.0.1", port), 17)
        assert raw is not None
        answer = dns.message.from_wire(raw)
        assert answer.rcode() == dns.rcode.NOERROR
        assert learnt == [("10.0.0.2", ["alias.world.test", "api.world.test"], [(worlddns.WORLD_IP, 30)])]
        assert answer_addresses(answer)[1] == [(worlddns.WORLD_IP, 30)]
        assert [(f.verdict, f.reason, f.l7["query"]) for f in flows] == [
            ("dropped", "DNS_REFUSED", "mirror.example.test"), ("forwarded", "DNS_ALLOWED", "alias.world.test")]
        assert flows[1].cookie != 0 and flows[1].l7["ips"] == [worlddns.WORLD_IP]
        assert (proxy.stats.refused, proxy.stats.allowed) == (1, 1)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        await proxy.close()


async def test_a_silent_server_gives_servfail_within_the_bound() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    flows: list[Any] = []

    async def learn(*_args: object) -> None:
        raise AssertionError("nothing to learn")

    proxy = DNSProxy(sockets=NetnsSockets(None), port=0, verdict=verdict, learn=learn, publish=flows.extend,
                     timeout=0.5)
    try:
        began = time.monotonic()
        raw = await proxy.handle(query("api.world.test"), ("10.0.0.2", 5000), silent.getsockname(), 17)
        assert time.monotonic() - began < 2.0
        assert raw is not None and dns.message.from_wire(raw).rcode() == dns.rcode.SERVFAIL
        assert flows[0].reason == "DNS_TIMEOUT" and proxy.stats.timeouts == 1
        assert await proxy.handle(b"not dns", ("10.0.0.2", 5000), silent.getsockname(), 17) is None
    finally:
        silent.close()
        await proxy.close()
