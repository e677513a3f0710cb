"""What the DNS proxy speaks: transparent-socket options, DNS messages, the shared upstream socket, TCP framing.

Owns the socket constants the proxy (and tests) set (``IP_TRANSPARENT``,
``IP_RECVORIGDSTADDR``), :func:`orig_dst` (the original destination of a
redirected datagram), :func:`refusal` and :func:`answer_addresses` (DNS messages,
dnspython), :class:`UpstreamUDP` (one socket for every forwarded query, ids
rewritten so answers cannot be confused or spoofed by another sender) and
:func:`read_framed` (RFC 7766 length-prefixed messages over TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from ciliary.nodeagent.dns_policy import canonical

SOL_IP = 0
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
MAX_DATAGRAM = 65535


def orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntoa(data[4:8]), port
    return None


def refusal(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.flags |= dns.flags.RA
    return response.to_wire()


def answer_addresses(response: dns.message.Message) -> tuple[list[str], list[tuple[str, int]]]:
    """(the names the answer speaks for, [(IPv4 address, ttl)]) from its A records and CNAME chain."""
    names: list[str] = [canonical(q.name.to_text()) for q in response.question]
    answers: list[tuple[str, int]] = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.CNAME):
            names.append(canonical(rrset.name.to_text()))
        if rrset.rdtype == dns.rdatatype.A:
            answers.extend((rd.address, int(rrset.ttl)) for rd in rrset)
    return list(dict.fromkeys(names)), answers


class UpstreamUDP:
    """One unconnected UDP socket in the node's namespace for every forwarded query.

    Each query leaves under an id no other pending query to that server has; an answer is
    taken only from the server asked, with that id, and gets the pod's own id back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: dict[tuple[tuple[str, int], int], asyncio.Future[bytes]] = {}
        self._next = random.randrange(1 << 16)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) < 2:
                continue
            future = self.pending.get(((peer[0], peer[1]), struct.unpack("!H", data[:2])[0]))
            if future is not None and not future.done():
                future.set_result(data)

    async def exchange(self, data: bytes, server: tuple[str, int], timeout: float) -> bytes | None:
        if len(data) < 2:
            return None
        for _ in range(1 << 16):
            self._next = (self._next + 1) & 0xFFFF
            if (server, self._next) not in self.pending:
                break
        else:
            return None
        key = (server, self._next)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        try:
            self.sock.sendto(struct.pack("!H", self._next) + data[2:], server)
            reply = await asyncio.wait_for(future, timeout)
        except (TimeoutError, OSError):
            return None
        finally:
            self.pending.pop(key, None)
        return data[:2] + reply[2:]

    def close(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


async def read_framed(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
    """One length-prefixed DNS message (RFC 7766); None at a clean end of stream."""
    head = await _read_exact(loop, sock, 2)
    if head is None:
        return None
    size = struct.unpack("!H", head)[0]
    return await _read_exact(loop, sock, size)


async def _read_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
