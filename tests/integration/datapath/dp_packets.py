"""Hand-built Ethernet frames (struct packing, no scapy) and BPF_PROG_TEST_RUN of the loaded tc programs.

``frame(...)`` builds IPv4 TCP/UDP/ICMP frames (optionally fragments or with a bad
``ihl``), ``frame6(...)`` IPv6 ones. ``Runner`` runs a frame through the pinned
``cy_from_pod`` / ``cy_to_pod`` programs of a started ``engine.Datapath`` and returns
the tc verdict (optionally on a host veth: ``skb->ifindex``, run inside the node's netns);
it can empty ``cy_ct`` so that every run is a policy-only decision.
Used by test_datapath_parser.py and test_datapath_differential.py.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

from ciliary.nodeagent.datapath import engine, libbpf, loading, maps

TC_ACT_OK = 0
TC_ACT_SHOT = 2
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
MF, OFFSET_MASK = 0x2000, 0x1FFF

DIFFERENTIAL: dict[str, float] = {"policies": 0, "packets": 0, "verdicts": 0, "enforced": 0, "dropped": 0,
                                 "spoofed": 0, "own_veth": 0, "seconds": 0.0}
"""What test_datapath_differential compared in this session (printed by conftest's terminal summary)."""


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def l4_header(protocol: int, sport: int, dport: int, *, tcp_flags: int = 0x02, icmp_type: int = 8,
              icmp_id: int = 0x1234) -> bytes:
    if protocol == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, tcp_flags, 65535, 0, 0)
    if protocol == UDP:
        return struct.pack("!HHHH", sport, dport, 8, 0)
    if protocol == ICMP:
        head = struct.pack("!BBHHH", icmp_type, 0, 0, icmp_id, 1)
        return struct.pack("!BBHHH", icmp_type, 0, checksum(head), icmp_id, 1)
    return b""


def ipv4_header(src: str, dst: str, protocol: int, payload_len: int, *, ihl: int = 5, frag: int = 0,
                ident: int = 1) -> bytes:
    options = b"\0" * (max(ihl, 5) - 5) * 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + payload_len, ident, frag, 64,
                       protocol, 0, IPv4Address(src).packed, IPv4Address(dst).packed) + options
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:]


def frame(src: str, dst: str, protocol: int, sport: int = 40000, dport: int = 80, *, ihl: int = 5,
          frag: int = 0, payload: bytes = b"", l4: bytes | None = None, dst_mac: bytes = DST_MAC,
          src_mac: bytes = SRC_MAC, **l4_args: int) -> bytes:
    """An Ethernet + IPv4 frame; ``l4`` replaces the generated L4 header (b"" for none)."""
    body = (l4_header(protocol, sport, dport, **l4_args) if l4 is None else l4) + payload
    return dst_mac + src_mac + b"\x08\x00" + ipv4_header(src, dst, protocol, len(body), ihl=ihl, frag=frag) + body


def frame6(src: str, dst: str, next_header: int, body: bytes, *, hop_limit: int = 64,
           dst_mac: bytes = DST_MAC, src_mac: bytes = SRC_MAC) -> bytes:
    head = struct.pack("!IHBB16s16s", 6 << 28, len(body), next_header, hop_limit, IPv6Address(src).packed,
                       IPv6Address(dst).packed)
    return dst_mac + src_mac + b"\x86\xdd" + head + body


def icmp6(icmp_type: int) -> bytes:
    """An ICMPv6 message of ``icmp_type`` (checksum left 0: the datapath does not check it)."""
    return struct.pack("!BBHI", icmp_type, 0, 0, 0) + b"\0" * 16


class Runner:
    """BPF_PROG_TEST_RUN of a started Datapath's two programs, in the caller's network namespace."""

    def __init__(self, dp: engine.Datapath) -> None:
        self.dp = dp
        self.fds = {hook: loading.open_pinned(loading.program_pin_path(dp.pin_dir, hook, sha))
                    for hook, sha in dp.program_hashes.items()}
        self.ct_fd = loading.open_pinned(dp.pin_dir / "cy_ct")
        self.runs = 0

    def run(self, hook: str, packet: bytes, ifindex: int = 0) -> int:
        """The verdict on ``packet``; with ``ifindex`` the skb is on that device of the node's netns
        (a host veth), else on the caller's loopback (a veth the datapath does not know)."""
        self.runs += 1
        if not ifindex:
            return libbpf.prog_test_run(self.fds[hook], packet)
        assert self.dp.netns, "a veth ifindex needs the Datapath's netns"
        with thread_in_netns(self.dp.netns):
            return libbpf.prog_test_run(self.fds[hook], packet, ifindex=ifindex)

    def clear_conntrack(self) -> int:
        """Delete every cy_ct entry (bounded); how many there were."""
        key, nxt = maps.CtKeyC(), maps.CtKeyC()
        keys = []
        for _ in range(100_000):
            if libbpf.lib.bpf_map_get_next_key(self.ct_fd, ct.byref(key) if keys else None, ct.byref(nxt)) < 0:
                break
            keys.append(maps.CtKeyC.from_buffer_copy(nxt))
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
        for k in keys:
            libbpf.lib.bpf_map_delete_elem(self.ct_fd, ct.byref(k))
        return len(keys)

    def close(self) -> None:
        for fd in (*self.fds.values(), self.ct_fd):
            os.close(fd)


CLONE_NEWNET = 0x40000000
_libc = ct.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ct.get_errno(), f"setns {what}: {os.strerror(ct.get_errno())}")


@contextlib.contextmanager
def thread_in_netns(netns: str) -> Iterator[None]:
    """The calling thread in network namespace ``netns`` for the block (setns acts per thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target, netns)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, "back")
    finally:
        os.close(own)


def send_raw(netns: str, ifname: str, packet: bytes) -> None:
    """Send ``packet`` as is from ``ifname`` in ``netns`` (AF_PACKET: no IP stack on the way out)."""
    code = ("import socket,sys;s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);"
            f"s.bind(({ifname!r},0));s.send(bytes.fromhex(sys.argv[1]))")
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, packet.hex()], check=True,
                   timeout=20)


def mac_of(netns: str, ifname: str) -> bytes:
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", ifname], check=True, capture_output=True,
                         text=True, timeout=10).stdout
    return bytes.fromhex(out.split("link/ether", 1)[1].split()[0].replace(":", ""))

