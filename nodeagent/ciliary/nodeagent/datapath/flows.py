"""Flow events: the cy_events ring buffer decoded into :class:`FlowEvent`.

Used by ``engine.Datapath.flows()``. Synchronous use: ``reader.poll(ms)``.
asyncio use (no threads): ``reader.attach(loop)`` registers the ring buffer's
epoll fd with ``loop.add_reader`` and consumes on readiness (bcc pitfall B6:
consume, never poll, from a reader callback). Events the kernel could not
queue are counted in cy_lost; :meth:`FlowReader.lost` reports them.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes as ct
import dataclasses
import functools
import os
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from ciliary.nodeagent.datapath import libbpf, maps

DIRECTIONS = {1: "ingress", 2: "egress"}
VERDICTS = {1: "forwarded", 2: "dropped"}


@dataclasses.dataclass(frozen=True)
class FlowEvent:
    time: float
    """Wall-clock seconds (converted from the kernel's monotonic timestamp)."""
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    """IPv6 only for dropped IPv6 packets (reason DROP_UNSUPPORTED_L3)."""
    sport: int
    """TCP/UDP source port; ICMP: the ICMP type."""
    dport: int
    protocol: int
    tcp_flags: int
    verdict: str
    """forwarded or dropped."""
    reason: maps.Reason
    direction: str
    """The endpoint's policy direction: ingress (to the pod) or egress (from the pod)."""
    is_reply: bool
    ep_id: int
    src_identity: int
    dst_identity: int
    cookie: int
    """Rule cookie (planning.rule_cookie) of the deciding entry; 0 when none."""
    ifindex: int
    length: int
    established: bool = False
    """A forward packet of a tracked connection, not its first (monitor aggregation's flag and interval
    reports, or every packet with ``none``)."""
    match_type: int = 0
    """consts.h ``CY_MATCH_*`` (Hubble's ``policy_match_type`` numbers): the kind of entry that decided
    (``hubble_convert.MATCH_TYPES``); 0 when none did (default deny, replies, unenforced endpoints)."""
    frontend: tuple[str, int] | None = None
    """The Service frontend (address, port) a pod's socket asked for when it opened this connection
    (socket load balancing translated it to ``dst``, or for a reply to ``src``); None when it opened none."""


_EVENT = struct.Struct("=QIIHH8B6I16s16sB3xIH2x")
"""``maps.FlowEventC`` (types.h ``struct flow_event``) in native byte order: one unpack instead of a ctypes
structure and an attribute read per field."""
_REASONS = {int(reason): reason for reason in maps.Reason}


@functools.lru_cache(maxsize=4096)
def _v4(value: int) -> IPv4Address:
    """An IPv4 address as the kernel stores it (network order, read natively); a node's flows repeat a few
    hundred addresses, so they are remembered (the conversion was a tenth of a decode)."""
    return maps.u32_to_addr(value)


@functools.lru_cache(maxsize=1024)
def _frontend(address: int, port: int) -> tuple[str, int]:
    return str(maps.u32_to_addr(address)), socket.ntohs(port)


def decode(raw: bytes, *, mono_to_wall: float | None = None) -> FlowEvent:
    """One ring-buffer record as a :class:`FlowEvent`. The agent decodes every record of a busy node (several per
    connection): ~3 µs against ~10 µs field by field through ctypes, in the same process
    (``tests/unit/nodeagent/test_agent_flows.py``)."""
    # ljust: a program compiled before flow_event grew (still attached while an upgraded agent
    # starts) sends shorter records; their missing tail (the IPv6 fields) reads as zeros
    if len(raw) < _EVENT.size:
        raw = raw.ljust(_EVENT.size, b"\0")
    (ts_ns, saddr, daddr, sport, dport, protocol, tcp_flags, verdict, reason, direction, is_reply, family, established,
     ep_id, src_identity, dst_identity, cookie, ifindex, length, saddr6, daddr6, match_type, svc_addr,
     svc_port) = _EVENT.unpack_from(raw)
    offset = mono_to_wall if mono_to_wall is not None else time.time() - time.monotonic()
    v6 = family == 6
    icmp = protocol == 1 or (v6 and protocol == 58)
    fields = {
        "time": ts_ns / 1e9 + offset,
        "src": IPv6Address(saddr6) if v6 else _v4(saddr),
        "dst": IPv6Address(daddr6) if v6 else _v4(daddr),
        "sport": sport if icmp else socket.ntohs(sport),
        "dport": dport if icmp else socket.ntohs(dport),
        "protocol": protocol,
        "tcp_flags": tcp_flags,
        "verdict": VERDICTS.get(verdict, str(verdict)),
        "reason": _REASONS.get(reason) or maps.Reason(reason),  # an unknown reason raises as before
        "direction": DIRECTIONS.get(direction, str(direction)),
        "is_reply": bool(is_reply),
        "ep_id": ep_id,
        "src_identity": src_identity,
        "dst_identity": dst_identity,
        "cookie": cookie,
        "ifindex": ifindex,
        "length": length,
        "established": bool(established),
        "match_type": match_type,
        "frontend": _frontend(svc_addr, svc_port) if svc_addr else None,
    }
    # the frozen dataclass's __init__ sets each field through object.__setattr__ (a quarter of the old
    # decode); every field is given here, so filling the instance's __dict__ makes the same object
    event = object.__new__(FlowEvent)
    event.__dict__.update(fields)
    return event


BATCH = 1024
"""Events handed to the consumer at once, also while the ring buffer is still being drained."""


class FlowReader:
    """Reads cy_events, the node's pinned ring buffer, through libbpf (no bcc object).

    Owns dups of the two map fds it is given; :meth:`close` releases them.
    """

    def __init__(self, events_fd: int, lost_fd: int, *, sink: Callable[[FlowEvent], None] | None = None,
                 buffer: int = 65536) -> None:
        self._sink = sink
        self.events: collections.deque[FlowEvent] = collections.deque(maxlen=buffer)
        self.dropped_by_reader = 0
        """Events decoded while the local deque was full (oldest discarded)."""
        self._offset = time.time() - time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_batch: Callable[[list[FlowEvent]], None] | None = None
        self._ring = libbpf.RingBuffer(events_fd, self._on_event)
        self._lost_fd = os.dup(lost_fd)

    def _on_event(self, _ctx: int | None, data: int, size: int) -> int:
        # The data pointer is valid only during the callback: copy (bcc pitfall B5).
        event = decode(ct.string_at(data, size), mono_to_wall=self._offset)
        if self._sink is not None:
            self._sink(event)
        else:
            if len(self.events) == self.events.maxlen:
                self.dropped_by_reader += 1
            self.events.append(event)
            if self._on_batch is not None and len(self.events) >= BATCH:
                # a busy ring never lets consume() return: hand over from inside it
                self._on_batch(self.drain())
        return 0

    def poll(self, timeout_ms: int = 0) -> list[FlowEvent]:
        """Wait up to ``timeout_ms`` for events; return (and forget) the buffered ones."""
        self._ring.poll(timeout_ms)
        return self.drain()

    def drain(self) -> list[FlowEvent]:
        out = list(self.events)
        self.events.clear()
        return out

    def fileno(self) -> int:
        return self._ring.epoll_fd()

    def attach(self, loop: asyncio.AbstractEventLoop,
               on_batch: Callable[[list[FlowEvent]], None] | None = None) -> None:
        """Consume from ``loop`` whenever the ring buffer has data.

        With ``on_batch``, every consumed batch is handed over at once (no local
        buffering between the ring and the consumer, so nothing waits for a timer).
        """
        if on_batch is None:
            loop.add_reader(self.fileno(), self._ring.consume)
        else:
            self._on_batch = on_batch

            def consume() -> None:
                self._ring.consume()
                if self.events:
                    on_batch(self.drain())

            loop.add_reader(self.fileno(), consume)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fileno())
            self._loop = None

    def close(self) -> None:
        """Detach, then free the ring buffer and the map fds (the reader is unusable after)."""
        if self._lost_fd < 0:
            return
        self.detach()
        self._ring.close()
        os.close(self._lost_fd)
        self._lost_fd = -1

    def lost(self) -> int:
        """Events the kernel dropped because the ring buffer was full (all CPUs)."""
        return int(sum(v.events for v in maps.read_percpu(self._lost_fd, 0, maps.LostC)))
