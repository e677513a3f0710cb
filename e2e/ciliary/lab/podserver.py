"""The workload inside a lab pod (and the world host): one small server per port.

TCP ports answer HTTP/1.1: any method, any path, 200 with a body naming the pod.
UDP ports echo each datagram back. Run as
``python -m ciliary.lab.podserver --name NS/POD --tcp 80 --udp 53``; the process
exits non-zero at once if a port cannot be bound (the runtime reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import cast


def _http_response(name: str, request_line: str) -> bytes:
    body = f"{name}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Content-Type: text/plain\r\n"
        f"X-Ciliary-Pod: {name}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if request_line.startswith("HEAD ") else body)


async def _serve_http(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request_line = (await asyncio.wait_for(reader.readline(), 10)).decode(errors="replace")
        for _ in range(100):  # headers, bounded
            line = await asyncio.wait_for(reader.readline(), 10)
            if line in (b"\r\n", b"\n", b""):
                break
        writer.write(_http_response(name, request_line))
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector transport does not subclass DatagramTransport on every Python
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(name: str, tcp: list[int], udp: list[int], bind: str = "0.0.0.0") -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in tcp:
        servers.append(await asyncio.start_server(
            lambda r, w: _serve_http(name, r, w), host=bind, port=port, reuse_address=True))
    for port in udp:
        await loop.create_datagram_endpoint(_Echo, local_addr=(bind, port))
    print(f"serving {name}: tcp={tcp} udp={udp}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ciliary lab pod workload: HTTP on TCP ports, echo on UDP ports")
    parser.add_argument("--name", required=True, help="name to answer with (NAMESPACE/POD)")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP port serving HTTP")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port echoing")
    parser.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.name, args.tcp, args.udp, args.bind))
    except OSError as exc:
        print(f"cannot serve: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
