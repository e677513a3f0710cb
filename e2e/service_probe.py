"""The e2e Services tests' client: a script run inside a namespace (a pod's, a node's, the world host's).

``python -c PROBE kind ip port count timeout`` makes ``count`` TCP requests (one connection each,
an HTTP GET; the lab's servers answer with their pod's name) or UDP exchanges (``udp``, or
``udp-connected`` on a connected socket, which reports an ICMP port unreachable) to ``ip:port`` and
prints one JSON result per attempt: ``{"ok": true, "peer", "body"}`` or ``{"ok": false, "errno",
"kind" (the exception's class), "error", "seconds"}``. ``SAME_PORT_AGAIN`` reuses one source port, first
through a NodePort and then straight to the backend; :func:`failed` picks a run's unanswered attempts.
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


#: From one source port: GETs through ``ip:port`` (a NodePort another node translates) until the answer comes
#: from the backend named by the fourth argument, then straight to that backend's address from the same port.
#: Prints the port, the body through the NodePort, and the direct GET's outcome.
SAME_PORT_AGAIN = r"""
import json, socket, sys, time
np_ip, np_port, direct_ip, want = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def get(local_port, ip, port, timeout):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind(("0.0.0.0", local_port))
        s.connect((ip, port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.partition(b"\r\n\r\n")[2].decode().strip()
    finally:
        s.close()

for local_port in range(41000, 41040):
    try:
        body = get(local_port, np_ip, np_port, 2.0)
    except OSError:
        continue
    if body != want:
        continue
    began = time.monotonic()
    try:
        direct = {"ok": True, "body": get(local_port, direct_ip, 8080, 5.0)}
    except OSError as exc:
        direct = {"ok": False, "error": str(exc)}
    direct["seconds"] = round(time.monotonic() - began, 3)
    print(json.dumps({"port": local_port, "through": body, "direct": direct}))
    break
else:
    print(json.dumps({}))
"""


def failed(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """The attempts of a PROBE run that were not answered, with their position (what an assertion shows)."""
    return [dict(r, attempt=i) for i, r in enumerate(results) if not r["ok"]]
