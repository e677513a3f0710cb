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

One frontend alone (a Service change) is probed with overlapping attempts instead: a new connect every
``--gap`` while earlier ones are still in flight (each still given ``--attempt``), so the resolution is the
gap, not an attempt plus the gap (a connect made before the proxy changed may never complete, whatever the
proxy: the socket load balancer translates at connect(), iptables and nftables the SYN they saw, whose
retransmission comes only after a second); its ``sweeps`` are then the connects made.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import time

IN_FLIGHT = 192  # answered ones spread over three backends: ~64 each, below the lab app's backlog (100)


def _connect(target: tuple[str, int]) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return s, s.connect_ex(target)


def sweep(pending: list[tuple[str, int]], answered: dict[tuple[str, int], float], attempt: float) -> None:
    sel = selectors.DefaultSelector()
    queue = list(pending)
    started: dict[socket.socket, tuple[tuple[str, int], float]] = {}
    while queue or started:
        while queue and len(started) < IN_FLIGHT:
            target = queue.pop()
            s, code = _connect(target)
            if code == 0:
                answered[target] = time.monotonic()
                s.close()
            elif code == errno.EINPROGRESS:
                started[s] = (target, time.monotonic())
                sel.register(s, selectors.EVENT_WRITE)
            else:
                s.close()
        for key, _ in sel.select(timeout=min(0.05, attempt / 4)):
            done = key.fileobj
            assert isinstance(done, socket.socket)
            target, _t = started.pop(done)
            sel.unregister(done)
            if done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                answered[target] = time.monotonic()
            done.close()
        now = time.monotonic()
        for s, (_target, t) in list(started.items()):
            if now - t > attempt:
                started.pop(s)
                sel.unregister(s)
                s.close()
    sel.close()


def overlap(target: tuple[str, int], gap: float, attempt: float, end: float) -> tuple[float | None, int]:
    """(when ``target`` first answered or None at ``end``, connects made): a connect every ``gap`` seconds."""
    sel = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    made = 0
    answered: float | None = None
    next_at = time.monotonic()
    try:
        while answered is None and time.monotonic() < end:
            now = time.monotonic()
            if now >= next_at:
                next_at = now + gap
                s, code = _connect(target)
                made += 1
                if code == 0:
                    answered = time.monotonic()
                    s.close()
                    break
                if code == errno.EINPROGRESS:
                    started[s] = now
                    sel.register(s, selectors.EVENT_WRITE)
                else:
                    s.close()
            for key, _ in sel.select(timeout=max(0.0, next_at - time.monotonic())):
                done = key.fileobj
                assert isinstance(done, socket.socket)
                started.pop(done)
                sel.unregister(done)
                if done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and answered is None:
                    answered = time.monotonic()
                done.close()
            now = time.monotonic()
            for s, t in list(started.items()):
                if now - t > attempt:
                    started.pop(s)
                    sel.unregister(s)
                    s.close()
    finally:
        for s in started:
            s.close()
        sel.close()
    return answered, made


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
    if len(targets) == 1:
        when, sweeps = overlap(targets[0], args.gap, args.attempt, end)
        if when is not None:
            answered[targets[0]] = when
    while len(targets) > 1 and len(answered) < len(targets) and time.monotonic() < end:
        sweep([t for t in targets if t not in answered], answered, args.attempt)
        sweeps += 1
        if len(answered) < len(targets):
            time.sleep(args.gap)
    times = list(answered.values())
    print(json.dumps({"answered": len(answered), "total": len(targets), "sweeps": sweeps,
                      "first": min(times) if times else None, "last": max(times) if times else None}), flush=True)


if __name__ == "__main__":
    main()
