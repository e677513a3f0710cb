"""How real lab nodes and the apiserver reach each other without a lab address in the root namespace.

The apiserver listens on 127.0.0.1 in the root namespace; kubelets live in node namespaces. One
gateway process (run in the root namespace) joins them in both directions:

- node → apiserver: in every node namespace a listener on ``127.0.0.1:6443`` (the kubelet's
  kubeconfig points there) forwards each connection to the apiserver on the root namespace's
  loopback. The listening socket is created by a thread that has entered the node namespace
  (``setns`` acts per thread; a socket stays in the namespace it was made in).
- apiserver → kubelet (exec, logs, port-forward): the apiserver's egress selector sends
  ``cluster`` traffic as HTTP CONNECT over a unix socket; the gateway dials the target address
  from inside the node namespace that owns it (node IP, or a pod address in the node's pod CIDR →
  namespace: the apiserver's pod and service proxy, ``pods/proxy``, reach pods this way), and refuses
  any other target.

- pods → apiserver (chart mode): ``--service HOST:PORT=TARGET`` adds a listener on ``HOST:PORT`` in
  every node namespace (the ``kubernetes`` Service's ClusterIP and port, a local address of each node
  namespace) relayed the same way, so in-cluster clients (the chart's pods) reach the apiserver;
- lab registry: the same relay for ``--forward PORT`` (the registry's loopback port), so an image
  named ``localhost:PORT/...`` means the same registry to a node's containerd and to root-namespace
  clients (skaffold, ``ctr push``).

Run: ``python -m ciliary.lab.nodegateway --apiserver-port PORT [--forward PORT] [--service H:P=T] --egress-socket PATH
--node NAME=NETNS=IP[=POD_CIDR] ...``. Bytes are copied, never parsed, after the CONNECT head.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT

log = logging.getLogger("ciliary.lab.nodegateway")
CLONE_NEWNET = 0x40000000
MAX_HEAD = 8192
NETNS_DIR = Path("/run/netns")
T = TypeVar("T")


class GatewayError(RuntimeError):
    """The gateway could not enter a namespace or bind a listener; carries the namespace."""

    def __init__(self, netns: str, message: str) -> None:
        super().__init__(f"{netns}: {message}")
        self.netns = netns


@dataclass(frozen=True)
class GatewayNode:
    name: str
    netns: str
    ip: str
    pod_cidr: str = ""  # the node's pods' addresses (empty: none are dialled through it)

    @classmethod
    def parse(cls, text: str) -> GatewayNode:
        name, netns, ip, *cidr = text.split("=", 3)
        return cls(name, netns, ip, *cidr)

    def flag(self) -> str:
        return f"{self.name}={self.netns}={self.ip}" + (f"={self.pod_cidr}" if self.pod_cidr else "")

    def owns(self, host: str) -> bool:
        """``host`` is this node's address or one of its pods'."""
        if host == self.ip:
            return True
        try:
            return bool(self.pod_cidr) and ipaddress.ip_address(host) in ipaddress.ip_network(self.pod_cidr)
        except ValueError:
            return False


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """Run ``make`` in a fresh thread that has entered network namespace ``netns``."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise GatewayError(netns, f"setns: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}")
    thread.start()
    thread.join(30)
    if failure:
        raise failure[0]
    if not result:
        raise GatewayError(netns, "entering the namespace timed out")
    return result[0]


def listener_in(netns: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    return in_netns(netns, make)


def parse_connect(head: bytes) -> tuple[str, int]:
    """``CONNECT host:port HTTP/1.1`` → (host, port); ValueError for anything else."""
    request_line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    parts = request_line.split()
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"not a CONNECT request: {request_line[:100]!r}")
    host, _, port = parts[1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad CONNECT target {parts[1][:100]!r}")
    return host.strip("[]"), int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()


def parse_service(text: str) -> tuple[tuple[str, int], int]:
    """``HOST:PORT=TARGET`` → ((host, port), target)."""
    listen, _, target = text.partition("=")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not target.isdigit():
        raise ValueError(f"expected HOST:PORT=TARGET, got {text!r}")
    return (host, int(port)), int(target)


class Gateway:
    """``relays``: node-namespace (address, port) → root-namespace loopback port (apiserver, registry)."""

    def __init__(self, relays: dict[tuple[str, int], int], egress_socket: Path,
                 nodes: Sequence[GatewayNode]) -> None:
        self.relays = relays
        self.egress_socket = egress_socket
        self.nodes = list(nodes)
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self) -> None:
        for node in self.nodes:
            for (host, listen), target in sorted(self.relays.items()):
                sock = listener_in(node.netns, listen, host)
                handler = functools.partial(self._relay, target)
                self.servers.append(await asyncio.start_server(handler, sock=sock))
                log.info("relay node=%s listen=%s:%d target=127.0.0.1:%d", node.name, host, listen, target)
        self.egress_socket.parent.mkdir(parents=True, exist_ok=True)
        self.egress_socket.unlink(missing_ok=True)
        self.servers.append(await asyncio.start_unix_server(self._connect, path=str(self.egress_socket)))
        self.egress_socket.chmod(0o600)
        log.info("egress proxy socket=%s nodes=%d", self.egress_socket, len(self.nodes))

    async def _relay(self, target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target), 10)
        except (OSError, TimeoutError) as exc:
            log.warning("relay to 127.0.0.1:%d failed: %s", target, exc)
            writer.close()
            return
        await splice((reader, writer), upstream)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            host, port = parse_connect(head[:MAX_HEAD])
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
            log.warning("egress request refused: %s", exc)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            writer.close()
            return
        netns = next((n.netns for n in self.nodes if n.owns(host)), None)
        if netns is None:
            log.warning("egress target neither a lab node nor one of its pods: %s:%d", host, port)
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            writer.close()
            return
        loop = asyncio.get_running_loop()
        try:
            sock = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
            upstream = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError, GatewayError) as exc:
            log.warning("egress dial %s:%d in %s failed: %s", host, port, netns, exc)
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await splice((reader, writer), upstream)


async def serve(gateway: Gateway) -> None:
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("gateway ready", flush=True)
    await stop.wait()
    for server in gateway.servers:
        server.close()
    gateway.egress_socket.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.nodegateway")
    parser.add_argument("--apiserver-port", required=True, type=int,
                        help="the apiserver's port on 127.0.0.1 in the root namespace")
    parser.add_argument("--forward", action="append", default=[], type=int,
                        help="also relay this loopback port from every node namespace (e.g. the lab registry)")
    parser.add_argument("--service", action="append", default=[], type=parse_service,
                        help="HOST:PORT=TARGET: also listen on HOST:PORT in every node namespace, relay to TARGET")
    parser.add_argument("--egress-socket", required=True, type=Path)
    parser.add_argument("--node", action="append", default=[], type=GatewayNode.parse, help="NAME=NETNS=IP")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    relays = {("127.0.0.1", APISERVER_RELAY_PORT): args.apiserver_port,
              **{("127.0.0.1", p): p for p in args.forward}, **dict(args.service)}
    asyncio.run(serve(Gateway(relays, args.egress_socket, args.node)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
