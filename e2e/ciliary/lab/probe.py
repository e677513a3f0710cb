"""Connectivity probes run inside a pod or the world host (``ciliary lab exec … -- python -m ciliary.lab.probe``).

  probe http IP PORT      HTTP GET /; prints the status line and body; exit 0 on 200
                          (--method PUT --path /v1/exhaust-port: another request line)
  probe udp IP PORT       sends a datagram, expects it echoed; exit 0 on echo
  probe ping IP           one ICMP echo through ping(8); exit 0 on reply
Exit status 1 means refused or timed out (the message says which), so tests and
the demo can tell "landed" from "dropped".
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys


def http(ip: str, port: int, timeout: float, method: str = "GET", path: str = "/",
         headers: tuple[str, ...] = ()) -> int:
    extra = "".join(f"{header}\r\n" for header in headers)
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {ip}\r\nContent-Length: 0\r\n{extra}"
                         f"Connection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        print(f"timeout: no answer from {ip}:{port}/tcp within {timeout:g} s")
        return 1
    except OSError as exc:
        print(f"error: {ip}:{port}/tcp: {exc.strerror or exc}")
        return 1
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    print(f"{status} {body.decode(errors='replace').strip()}")
    return 0 if " 200 " in f"{status} " else 1


def udp(ip: str, port: int, timeout: float) -> int:
    payload = b"ciliary-probe"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(payload, (ip, port))
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            print(f"timeout: no echo from {ip}:{port}/udp within {timeout:g} s")
            return 1
        except OSError as exc:
            print(f"error: {ip}:{port}/udp: {exc.strerror or exc}")
            return 1
    print(f"echo {data.decode(errors='replace')}")
    return 0 if data == payload else 1


def ping(ip: str, timeout: float) -> int:
    proc = subprocess.run(["ping", "-c", "1", "-W", str(max(1, int(timeout))), ip],
                          capture_output=True, text=True, timeout=timeout + 5)
    print("reply" if proc.returncode == 0 else f"timeout: no ICMP echo reply from {ip}")
    return 0 if proc.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ciliary lab connectivity probe")
    parser.add_argument("kind", choices=["http", "udp", "ping"])
    parser.add_argument("ip")
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--method", default="GET", help="HTTP method (http only)")
    parser.add_argument("--path", default="/", help="HTTP request target (http only)")
    parser.add_argument("--header", action="append", default=[], help='"Name: value", repeatable (http only)')
    args = parser.parse_args(argv)
    if args.kind == "http":
        return http(args.ip, args.port, args.timeout, args.method, args.path, tuple(args.header))
    if args.kind == "udp":
        return udp(args.ip, args.port, args.timeout)
    return ping(args.ip, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
