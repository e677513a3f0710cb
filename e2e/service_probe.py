"""The e2e Services tests' client: a script run inside a namespace (a pod's, a node's, the world host's).

``python -c PROBE kind ip port count timeout`` makes ``count`` TCP requests (one connection each,
an HTTP GET; the lab's servers answer with their pod's name) or UDP exchanges (``udp``, or
``udp-connected`` on a connected socket, which reports an ICMP port unreachable) to ``ip:port`` and
prints one JSON result per attempt: ``{"ok": true, "peer", "body"}`` or ``{"ok": false, "errno",
"kind" (the exception's class), "error", "seconds"}``.
"""

PROBE = r"""
import json, socket, sys, time
kind, ip, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
out = []
for _ in range(count):
    began = time.monotonic()
    try:
        if kind == "tcp":
            s = socket.create_connection((ip, port), timeout=timeout)
            peer = s.getpeername()
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            s.close()
            body = data.partition(b"\r\n\r\n")[2].decode().strip()
        elif kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(b"hello", (ip, port))
            data, peer = s.recvfrom(4096)
            s.close()
            body = data.decode()
        else:  # udp-connected: an ICMP error for the datagram fails recv() (an unconnected socket ignores it)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.connect((ip, port))
            s.send(b"hello")
            data, peer = s.recv(4096), s.getpeername()
            s.close()
            body = data.decode()
        out.append({"ok": True, "peer": f"{peer[0]}:{peer[1]}", "body": body})
    except OSError as exc:
        out.append({"ok": False, "errno": exc.errno, "kind": type(exc).__name__, "error": str(exc),
                    "seconds": time.monotonic() - began})
print(json.dumps(out))
"""
