"""Probe frontends until each has answered once (run inside a pod's namespace and cgroup, or the world host).

    python frontend_probe.py --targets FILE --deadline SECONDS [--gap SECONDS] [--attempt SECONDS]
    # FILE: [["10.96.64.0", 80], ...]

Sweeps the frontends that have not answered yet with non-blocking TCP connects (at most 192 at a time, each
given ``--attempt`` seconds, default 0.1): a completed handshake is an answer (the socket is closed at once),
a refusal, an unreachable network or a timeout is not. A frontend no proxy serves yet gets no answer at all
on the lab's nodes (its packets leave towards the world host, which drops them), and the kernel would
retransmit that SYN only after a second; a fresh connect per sweep instead keeps the resolution at one
sweep plus the gap, a sweep taking about one attempt per 192 frontends still pending. Sleeps ``--gap``
between sweeps so the prober does not starve the proxies it waits for. Prints one JSON object: answered,
total, first and last answer (CLOCK_MONOTONIC seconds, the clock every process of the machine shares),
sweeps. Exits when every frontend answered or at the deadline.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import time

IN_FLIGHT = 192  # answered ones spread over three backends: ~64 each, below the lab app's backlog (100)


def sweep(pending: list[tuple[str, int]], answered: dict[tuple[str, int], float], attempt: float) -> None:
    sel = selectors.DefaultSelector()
    queue = list(pending)
    started: dict[socket.socket, tuple[tuple[str, int], float]] = {}
    while queue or started:
        while queue and len(started) < IN_FLIGHT:
            target = queue.pop()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            code = s.connect_ex(target)
            if code == 0:
                answered[target] = time.monotonic()
                s.close()
            elif code == errno.EINPROGRESS:
                started[s] = (target, time.monotonic())
                sel.register(s, selectors.EVENT_WRITE)
            else:
                s.close()
        for key, _ in sel.select(timeout=min(0.05, attempt / 4)):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            target, _t = started.pop(s)
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                answered[target] = time.monotonic()
            s.close()
        now = time.monotonic()
        for s, (_target, t) in list(started.items()):
            if now - t > attempt:
                started.pop(s)
                sel.unregister(s)
                s.close()
    sel.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", required=True, help="JSON file: a list of [ip, port]")
    ap.add_argument("--deadline", type=float, required=True, help="seconds from start to give up")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between sweeps")
    ap.add_argument("--attempt", type=float, default=0.1, help="seconds one connect may take to complete")
    args = ap.parse_args()
    with open(args.targets) as f:
        targets = [(str(ip), int(port)) for ip, port in json.load(f)]
    print("READY", flush=True)
    answered: dict[tuple[str, int], float] = {}
    end = time.monotonic() + args.deadline
    sweeps = 0
    while len(answered) < len(targets) and time.monotonic() < end:
        sweep([t for t in targets if t not in answered], answered, args.attempt)
        sweeps += 1
        if len(answered) < len(targets):
            time.sleep(args.gap)
    times = list(answered.values())
    print(json.dumps({"answered": len(answered), "total": len(targets), "sweeps": sweeps,
                      "first": min(times) if times else None, "last": max(times) if times else None}), flush=True)


if __name__ == "__main__":
    main()
