"""The node's DNS proxy: pods' queries that a ``rules.dns`` entry redirects (lib/redirect.h) land here.

Owns :class:`DNSProxy`, the async shell around ``dns_policy`` and ``fqdn_cache``.
It listens on one port, UDP and TCP, in the node's network namespace
(``netns_sockets``), with ``IP_TRANSPARENT`` (``dns_wire``) so the datapath can hand it packets
addressed to any server. For each query it

1. finds the rules that apply (``dns_policy.query_verdict``, against the intent
   in force) and the question's name; a name no rule allows, a query it cannot
   parse the question of, or a pod/server no DNS entry covers is answered
   ``REFUSED`` at once (never forwarded);
2. forwards an allowed query, unchanged, to the original destination (the
   server the pod asked) from the node, and waits at most ``timeout`` seconds;
   no answer in time -> ``SERVFAIL`` to the pod, so no client waits forever;
3. hands the answer's A records to ``learn`` (the FQDN cache and the datapath
   apply: the answer is released only once the addresses are allowed, or after
   ``learn``'s own bound), then relays the server's answer unchanged, sent from
   the original server address and port (UDP: a transparent socket bound to it;
   TCP: the accepted connection already has it as its local address);
4. publishes one L7 flow per exchange (``flows``): query name and type, rcode,
   addresses, the deciding rules, verdict ``forwarded`` or ``dropped``.

Everything is bounded: at most ``MAX_INFLIGHT`` queries at once (more are
dropped and counted, as a busy server would), TCP connections idle out after
``TCP_IDLE_S`` and carry at most ``TCP_MAX_QUERIES`` queries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from ciliary.nodeagent import dns_wire, planning
from ciliary.nodeagent.dns_policy import QueryVerdict, canonical
from ciliary.nodeagent.netns_sockets import NetnsSockets

log = logging.getLogger(__name__)

DEFAULT_PORT = 10053
UPSTREAM_TIMEOUT_S = 2.0
LEARN_TIMEOUT_S = 2.0
TCP_IDLE_S = 10.0
TCP_MAX_QUERIES = 100
MAX_INFLIGHT = 512
REPLY_SOCKETS = 64

Verdict = Callable[[str, str, int, int], QueryVerdict]
"""(client, server, port, protocol) -> the rules for that query."""
Learn = Callable[[str, list[str], list[tuple[str, int]]], Awaitable[None]]
"""(client, names, [(address, ttl)]) -> returns once the addresses are allowed (or gave up)."""


@dataclasses.dataclass(frozen=True)
class L7FlowEvent:
    """A DNS exchange as a flow: the attributes of ``datapath.flows.FlowEvent`` plus ``l7``."""

    time: float
    src: Any
    dst: Any
    sport: int
    dport: int
    protocol: int
    verdict: str
    reason: str
    src_identity: int
    dst_identity: int
    cookie: int
    l7: dict[str, Any]
    tcp_flags: int = 0
    direction: str = "egress"
    is_reply: bool = False
    ep_id: int = 0
    ifindex: int = 0
    length: int = 0


@dataclasses.dataclass
class ProxyStats:
    queries: int = 0
    allowed: int = 0
    refused: int = 0
    timeouts: int = 0
    malformed: int = 0
    overloaded: int = 0


class DNSProxy:
    """One node's DNS proxy (UDP and TCP on ``port``)."""

    def __init__(self, *, sockets: NetnsSockets, port: int, verdict: Verdict, learn: Learn,
                 publish: Callable[[list[Any]], Any], timeout: float = UPSTREAM_TIMEOUT_S) -> None:
        self.sockets = sockets
        self.port = port
        self.verdict = verdict
        self.learn = learn
        self.publish = publish
        self.timeout = timeout
        self.stats = ProxyStats()
        self.error = ""
        self.running = False
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept: asyncio.Task[None] | None = None
        self._replies: collections.OrderedDict[tuple[str, int], socket.socket] = collections.OrderedDict()
        self._upstream: dns_wire.UpstreamUDP | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        port = self.port

        def udp_setup(sock: socket.socket) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(dns_wire.SOL_IP, dns_wire.IP_TRANSPARENT, 1)
            sock.setsockopt(dns_wire.SOL_IP, dns_wire.IP_RECVORIGDSTADDR, 1)
            sock.bind(("0.0.0.0", port))

        def tcp_setup(sock: socket.socket) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(dns_wire.SOL_IP, dns_wire.IP_TRANSPARENT, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(256)

        try:
            self._udp = await self.sockets.make(socket.AF_INET, socket.SOCK_DGRAM, udp_setup)
            self._tcp = await self.sockets.make(socket.AF_INET, socket.SOCK_STREAM, tcp_setup)
        except OSError as exc:
            self.error = f"DNS proxy cannot listen on port {port}: {exc}"
            await self.close()
            raise
        loop = asyncio.get_running_loop()
        loop.add_reader(self._udp.fileno(), self._on_udp)
        self._accept = asyncio.create_task(self._accept_loop(), name="dns-proxy-accept")
        self.running = True
        self.error = ""
        log.info("DNS proxy listening", extra={"port": port, "netns": self.sockets.netns})

    async def close(self) -> None:
        self.running = False
        if self._udp is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._udp.fileno())
        if self._accept is not None:
            self._accept.cancel()
            await asyncio.gather(self._accept, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        for sock in (self._udp, self._tcp, *self._replies.values()):
            if sock is not None:
                sock.close()
        self._replies.clear()
        self._udp = self._tcp = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            self.stats.overloaded += 1
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ UDP

    def _on_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):
            try:
                data, ancdata, _flags, client = self._udp.recvmsg(dns_wire.MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("DNS proxy receive failed", extra={"error": str(exc)})
                return
            server = dns_wire.orig_dst(ancdata)
            if server is None:
                self.stats.malformed += 1
                continue
            self._spawn(self._udp_query(data, (client[0], client[1]), server))

    async def _udp_query(self, data: bytes, client: tuple[str, int], server: tuple[str, int]) -> None:
        response = await self.handle(data, client, server, socket.IPPROTO_UDP)
        if response is not None:
            await self._reply_udp(response, client, server)

    async def _reply_udp(self, payload: bytes, client: tuple[str, int], server: tuple[str, int]) -> None:
        """Send ``payload`` to the pod from ``server`` (a transparent socket bound to the server's address)."""
        sock = self._replies.get(server)
        if sock is None:
            def setup(s: socket.socket) -> None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(dns_wire.SOL_IP, dns_wire.IP_TRANSPARENT, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                s.bind(server)

            try:
                sock = await self.sockets.make(socket.AF_INET, socket.SOCK_DGRAM, setup)
            except OSError as exc:
                log.warning("DNS proxy cannot answer as the server", extra={"server": server[0], "error": str(exc)})
                return
            self._replies[server] = sock
            while len(self._replies) > REPLY_SOCKETS:
                self._replies.popitem(last=False)[1].close()
        else:
            self._replies.move_to_end(server)
        with contextlib.suppress(OSError):
            sock.sendto(payload, client)

    async def _upstream_udp(self, data: bytes, server: tuple[str, int]) -> bytes | None:
        """Forward over the shared upstream socket under a fresh id; the answer gets the pod's id back."""
        if self._upstream is None:
            self._upstream = dns_wire.UpstreamUDP(await self.sockets.make(socket.AF_INET, socket.SOCK_DGRAM,
                                                                  lambda s: s.bind(("0.0.0.0", 0))))
        return await self._upstream.exchange(data, server, self.timeout)

    # ------------------------------------------------------------------ TCP

    async def _accept_loop(self) -> None:
        assert self._tcp is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, client = await loop.sock_accept(self._tcp)
            except OSError as exc:
                log.warning("DNS proxy accept failed", extra={"error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._spawn(self._tcp_conn(conn, (client[0], client[1])))

    async def _tcp_conn(self, conn: socket.socket, client: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        server = conn.getsockname()[:2]
        try:
            for _ in range(TCP_MAX_QUERIES):
                data = await asyncio.wait_for(dns_wire.read_framed(loop, conn), TCP_IDLE_S)
                if data is None:
                    return
                response = await self.handle(data, client, (server[0], server[1]), socket.IPPROTO_TCP)
                if response is None:
                    return
                await loop.sock_sendall(conn, struct.pack("!H", len(response)) + response)
        except (TimeoutError, OSError):
            return
        finally:
            conn.close()

    async def _upstream_tcp(self, data: bytes, server: tuple[str, int]) -> bytes | None:
        sock = await self.sockets.make(socket.AF_INET, socket.SOCK_STREAM, lambda s: None)
        loop = asyncio.get_running_loop()
        try:
            async def exchange() -> bytes | None:
                await loop.sock_connect(sock, server)
                await loop.sock_sendall(sock, struct.pack("!H", len(data)) + data)
                return await dns_wire.read_framed(loop, sock)

            return await asyncio.wait_for(exchange(), self.timeout)
        finally:
            sock.close()

    # ------------------------------------------------------------------ one query

    async def handle(self, data: bytes, client: tuple[str, int], server: tuple[str, int],
                     protocol: int) -> bytes | None:
        """The bytes to answer ``client`` with (None: nothing, the query was not DNS)."""
        began = time.time()
        self.stats.queries += 1
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            self.stats.malformed += 1
            return None
        if len(query.question) != 1:
            self.stats.refused += 1
            return dns_wire.refusal(query, dns.rcode.FORMERR)
        question = query.question[0]
        name = canonical(question.name.to_text())
        qtype = dns.rdatatype.to_text(question.rdtype)
        verdict = self.verdict(client[0], server[0], server[1], protocol)
        cookie = planning.rule_cookie(verdict.entries[0].rules) if verdict.entries else 0
        flow = dict(client=client, server=server, protocol=protocol, name=name, qtype=qtype,
                    identity=verdict.endpoint.identity if verdict.endpoint else 0, peer=verdict.peer,
                    cookie=cookie)
        if not verdict.allows(name):
            self.stats.refused += 1
            self._flow(began, flow, "dropped", "DNS_REFUSED", "REFUSED", [],
                       verdict.reason or "no rule allows the name")
            return dns_wire.refusal(query, dns.rcode.REFUSED)
        try:
            if protocol == socket.IPPROTO_UDP:
                raw = await self._upstream_udp(data, server)
            else:
                raw = await self._upstream_tcp(data, server)
        except (TimeoutError, OSError) as exc:
            log.info("DNS upstream failed", extra={"server": server[0], "name": name, "error": str(exc)})
            raw = None
        if raw is None:
            self.stats.timeouts += 1
            self._flow(began, flow, "forwarded", "DNS_TIMEOUT", "SERVFAIL", [], "no answer from the server")
            return dns_wire.refusal(query, dns.rcode.SERVFAIL)
        try:
            response = dns.message.from_wire(raw)
        except dns.exception.DNSException:
            self.stats.malformed += 1
            self._flow(began, flow, "forwarded", "DNS_BAD_ANSWER", "SERVFAIL", [], "the server's answer does not parse")
            return dns_wire.refusal(query, dns.rcode.SERVFAIL)
        names, answers = dns_wire.answer_addresses(response)
        if answers:
            try:
                await asyncio.wait_for(self.learn(client[0], names, answers), LEARN_TIMEOUT_S)
            except TimeoutError:
                log.warning("Learnt addresses not applied in time; answering anyway",
                            extra={"name": name, "client": client[0]})
        self.stats.allowed += 1
        self._flow(began, flow, "forwarded", "DNS_ALLOWED", dns.rcode.to_text(response.rcode()),
                   [(a, t) for a, t in answers], "")
        return raw

    def _flow(self, began: float, f: dict[str, Any], verdict: str, reason: str, rcode: str,
              answers: list[tuple[str, int]], why: str) -> None:
        client, server = f["client"], f["server"]
        l7 = {"type": "dns", "query": f["name"], "qtype": f["qtype"], "rcode": rcode,
              "ips": [a for a, _t in answers], "ttl": min((t for _a, t in answers), default=0),
              "latency_ms": round((time.time() - began) * 1000, 3)}
        if why:
            l7["why"] = why
        event = L7FlowEvent(time=time.time(), src=ipaddress.IPv4Address(client[0]),
                            dst=ipaddress.IPv4Address(server[0]), sport=client[1], dport=server[1],
                            protocol=f["protocol"], verdict=verdict, reason=reason, src_identity=f["identity"],
                            dst_identity=f["peer"], cookie=f["cookie"], l7=l7)
        self.publish([event])
