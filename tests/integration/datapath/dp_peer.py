"""A traffic peer run inside a pod netns (``ip netns exec <ns> python dp_peer.py ...``).

``serve --tcp P,P --udp P,P``: TCP line echo and UDP echo servers (threads).
``client``: reads one JSON command per stdin line, answers one JSON line:
  {"op": "tcp", "ip", "port", "timeout"}      connect + one echo    -> {"result": "ok"|"timeout"|"refused"|"error"}
  {"op": "udp", "ip", "port", "timeout"}      one datagram echo
  {"op": "icmp", "ip", "timeout"}             one echo request/reply (raw socket)
  {"op": "open", "ip", "port", "timeout"}     keep a TCP connection -> {"result", "id"}
  {"op": "send", "id", "timeout"}             one echo on a kept connection
  {"op": "rr", "ip", "port", "n", "size"}     n request/response round trips -> {"result", "seconds"}
Every wait is bounded by its timeout. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time


def _tcp_server(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _udp_server(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    while True:
        data, peer = srv.recvfrom(65536)
        srv.sendto(data, peer)


def serve(tcp: list[int], udp: list[int]) -> None:
    for port in tcp:
        threading.Thread(target=_tcp_server, args=(port,), daemon=True).start()
    for port in udp:
        threading.Thread(target=_udp_server, args=(port,), daemon=True).start()
    print("READY", flush=True)
    deadline = time.monotonic() + float(os.environ.get("DP_PEER_LIFETIME", "3600"))
    while time.monotonic() < deadline:
        time.sleep(1)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp(ip: str, timeout: float) -> str:
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        payload = b"ciliary-ping"
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
        sock.sendto(packet, (ip, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, addr = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident and addr[0] == ip:
                return "ok"
    return "timeout"


def _echo(sock: socket.socket, timeout: float, size: int = 5) -> str:
    sock.settimeout(timeout)
    payload = b"x" * (size - 1) + b"\n"
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            return "error"
        got += chunk
    return "ok"


def client() -> None:
    kept: dict[int, socket.socket] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op, timeout = cmd["op"], float(cmd.get("timeout", 1.0))
        reply: dict[str, object] = {}
        try:
            if op == "tcp":
                with socket.create_connection((cmd["ip"], cmd["port"]), timeout=timeout) as sock:
                    reply["result"] = _echo(sock, timeout)
            elif op == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(timeout)
                    sock.sendto(b"hello", (cmd["ip"], cmd["port"]))
                    sock.recvfrom(2048)
                    reply["result"] = "ok"
            elif op == "icmp":
                reply["result"] = _icmp(cmd["ip"], timeout)
            elif op == "open":
                sock = socket.create_connection((cmd["ip"], cmd["port"]), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                kept[sock.fileno()] = sock
                reply["id"] = sock.fileno()
                reply["result"] = _echo(sock, timeout)
            elif op == "send":
                reply["result"] = _echo(kept[cmd["id"]], timeout)
            elif op == "close":
                kept.pop(cmd["id"]).close()
                reply["result"] = "ok"
            elif op == "rr":
                with socket.create_connection((cmd["ip"], cmd["port"]), timeout=timeout) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    began = time.perf_counter()
                    for _ in range(int(cmd["n"])):
                        if _echo(sock, timeout, int(cmd.get("size", 64))) != "ok":
                            raise TimeoutError
                    reply["seconds"] = time.perf_counter() - began
                    reply["result"] = "ok"
            else:
                reply["result"] = "error"
                reply["error"] = f"unknown op {op}"
        except TimeoutError:
            reply["result"] = "timeout"
        except ConnectionRefusedError:
            reply["result"] = "refused"
        except OSError as exc:
            reply["result"] = "timeout" if "timed out" in str(exc) else "error"
            reply["error"] = str(exc)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    sub.add_parser("client")
    args = parser.parse_args()
    if args.mode == "serve":
        serve([int(p) for p in args.tcp.split(",") if p], [int(p) for p in args.udp.split(",") if p])
    else:
        client()
