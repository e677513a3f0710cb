"""The world host's DNS server: a few fixed names, UDP and TCP, for ``rules.dns`` and ``toFQDNs``.

Run as ``python -m ciliary.lab.worlddns --address 192.0.2.53`` inside the world
host's namespace (the lab does, as process ``world-dns``). Authoritative for
:data:`ZONE` (names in lower case, no final dot): A and CNAME records with their
TTL; any other name under ``world.test`` or ``example.test`` is NXDOMAIN, any
other type NOERROR with no answer. Nothing is forwarded anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from ciliary.lab.layout import WORLD_DNS_IP, WORLD_IP

ZONE: dict[str, tuple[str, str, int]] = {
    "api.world.test": ("A", WORLD_IP, 30),
    "www.world.test": ("A", WORLD_IP, 30),
    "short.world.test": ("A", WORLD_IP, 3),
    "dns.world.test": ("A", WORLD_DNS_IP, 300),
    "alias.world.test": ("CNAME", "api.world.test", 30),
    "mirror.example.test": ("A", WORLD_IP, 30),
}
"""name -> (type, value, ttl)."""


def answer(wire: bytes) -> bytes | None:
    """The response to one query (None: not a DNS message)."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - anything unparsable is ignored, as a server would
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    name = question.name.to_text().lower().rstrip(".")
    seen = 0
    while name in ZONE and seen < 8:
        kind, value, ttl = ZONE[name]
        owner = dns.name.from_text(name + ".")
        if kind == "CNAME":
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME", value + "."))
            name, seen = value, seen + 1
            continue
        if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", "A", value))
        return response.to_wire()
    response.set_rcode(dns.rcode.NXDOMAIN if not response.answer else dns.rcode.NOERROR)
    return response.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def _tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(100):
            head = await asyncio.wait_for(reader.readexactly(2), 10)
            data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]), 10)
            reply = answer(data)
            if reply is None:
                return
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(address: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Udp, local_addr=(address, port))
    server = await asyncio.start_server(_tcp, host=address, port=port, reuse_address=True)
    print(f"world DNS on {address}:{port}: {len(ZONE)} names", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The lab world host's DNS server")
    parser.add_argument("--address", default=WORLD_DNS_IP)
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.address, args.port))
    except OSError as exc:
        print(f"cannot serve: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
