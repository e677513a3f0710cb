"""ctypes mirrors of ``datapath_c/include/types.h`` and map diff application.

Used by ``engine``: :func:`read_map` turns a kernel map into typed
``planning`` keys/values, :func:`apply_diff` writes a ``planning.MapDiff``
(capacity checked first, undone on failure), :func:`read_percpu` and
:func:`count_entries` read the counters and conntrack. Works on the fds of the
pinned maps through libbpf's element calls (``libbpf``): no bcc table object.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import enum
import errno as errno_mod
import functools
import os
import socket
import sys
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Generic, TypeVar

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import errors, libbpf

# ---------------------------------------------------------------- structs (types.h)


class IpcacheKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint32)]


class IpcacheValueC(ct.Structure):
    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32)]


class EndpointKeyC(ct.Structure):
    _fields_ = [("addr", ct.c_uint32)]


class EndpointInfoC(ct.Structure):
    _fields_ = [("ep_id", ct.c_uint32), ("identity", ct.c_uint32), ("flags", ct.c_uint32),
                ("ifindex", ct.c_uint32), ("revision", ct.c_uint32)]


class IfindexKeyC(ct.Structure):
    _fields_ = [("ifindex", ct.c_uint32)]


class PodAddrC(ct.Structure):
    """cy_ep_ifindex value: a pod's IPv4 (network order), a cy_endpoints key."""

    _fields_ = [("addr", ct.c_uint32)]


class PolicyKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("ep_id", ct.c_uint32), ("identity", ct.c_uint32),
                ("direction", ct.c_uint8), ("protocol", ct.c_uint8), ("dport", ct.c_uint16)]


class PolicyValueC(ct.Structure):
    _fields_ = [("cookie", ct.c_uint32), ("flags", ct.c_uint16), ("proxy_port", ct.c_uint16)]


class CtKeyC(ct.Structure):
    _fields_ = [("pod_addr", ct.c_uint32), ("peer_addr", ct.c_uint32), ("pod_port", ct.c_uint16),
                ("peer_port", ct.c_uint16), ("protocol", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class CtEntryC(ct.Structure):
    _fields_ = [("expires", ct.c_uint64), ("ep_id", ct.c_uint32), ("cookie", ct.c_uint32),
                ("origin", ct.c_uint8), ("reported", ct.c_uint8 * 2), ("pad", ct.c_uint8),
                ("last_report", ct.c_uint16 * 2), ("svc_addr", ct.c_uint32), ("svc_port", ct.c_uint16),
                ("pad2", ct.c_uint16)]


class CounterC(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class LostC(ct.Structure):
    """One CPU's cy_lost value (a bare __u64)."""

    _fields_ = [("events", ct.c_uint64)]


class FlowEventC(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("saddr", ct.c_uint32), ("daddr", ct.c_uint32),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("protocol", ct.c_uint8),
                ("tcp_flags", ct.c_uint8), ("verdict", ct.c_uint8), ("reason", ct.c_uint8),
                ("direction", ct.c_uint8), ("is_reply", ct.c_uint8), ("family", ct.c_uint8), ("established", ct.c_uint8),
                ("ep_id", ct.c_uint32), ("src_identity", ct.c_uint32), ("dst_identity", ct.c_uint32),
                ("cookie", ct.c_uint32), ("ifindex", ct.c_uint32), ("len", ct.c_uint32),
                ("saddr6", ct.c_uint8 * 16), ("daddr6", ct.c_uint8 * 16), ("match_type", ct.c_uint8),
                ("pad", ct.c_uint8 * 3), ("svc_addr", ct.c_uint32), ("svc_port", ct.c_uint16), ("pad2", ct.c_uint16)]


STRUCT_SIZES = {
    "ipcache_key": 8, "ipcache_value": 8, "endpoint_info": 20, "policy_key": 16,
    "policy_value": 8, "ct_key": 16, "ct_entry": 32, "counter": 16, "flow_event": 96,
}
"""sizeof() of each types.h struct; checked against the ctypes mirrors by the tests."""


class Reason(enum.IntEnum):
    """drop_reasons.h."""

    OK_POLICY = 1
    OK_REPLY = 2
    OK_UNENFORCED = 3
    DROP_POLICY_DENY = 4
    DROP_POLICY = 5
    DROP_INVALID = 6
    """L4 header truncated (unfragmented packet, enforced direction)."""
    DROP_FRAGMENT = 7
    """IPv4 fragment without (a complete) L4 header on an enforced direction: fragments are not tracked."""
    DROP_INVALID_L3 = 8
    """IPv4 header shorter than 20 bytes (ihl < 5, or the frame ends inside it)."""
    DROP_UNSUPPORTED_L3 = 9
    """IPv6 other than link-scoped Neighbor Discovery: no IPv6 policy exists yet."""
    DROP_SPOOFED_SOURCE = 10
    """IPv4 leaving a pod's veth with a source address that is not the pod's."""
    DROP_PROXY_UNAVAILABLE = 11
    """Its allow entry redirects to a node-local proxy and no proxy socket listens (fail closed)."""
    OK_PROXY = 12
    """Allowed and handed to the node-local proxy: egress DNS (lib/redirect.h), ingress HTTP (lib/l7redirect.h)."""
    OK_FROM_PROXY = 13
    """The node's HTTP proxy connecting to the pod (the request was judged by the proxy)."""


REASON_MAX = 16

# ---------------------------------------------------------------- byte order helpers


def addr_to_u32(ip: IPv4Address) -> int:
    """The u32 whose in-memory bytes are the address in network order."""
    return int.from_bytes(ip.packed, sys.byteorder)


def u32_to_addr(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, sys.byteorder))


# ---------------------------------------------------------------- codecs

K = TypeVar("K")
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Codec(Generic[K, V]):
    """How one map's typed keys/values become ctypes structs and back."""

    name: str
    key_c: type[ct.Structure]
    value_c: type[ct.Structure]
    encode_key: Callable[[K], ct.Structure]
    decode_key: Callable[[Any], K]
    encode_value: Callable[[V], ct.Structure]
    decode_value: Callable[[Any], V]


def _enc_ipcache_key(net: IPv4Network) -> IpcacheKeyC:
    return IpcacheKeyC(net.prefixlen, addr_to_u32(net.network_address))


def _dec_ipcache_key(k: IpcacheKeyC) -> IPv4Network:
    return IPv4Network(f"{u32_to_addr(k.addr)}/{k.prefixlen}", strict=False)


def encode_policy_key(key: planning.PolicyKey) -> PolicyKeyC:
    return PolicyKeyC(key.prefixlen, key.ep_id, key.identity, int(key.direction), key.protocol,
                      socket.htons(key.port))


def decode_policy_key(k: PolicyKeyC) -> planning.PolicyKey:
    return planning.PolicyKey(k.ep_id, planning.MapDirection(k.direction), k.identity, k.protocol,
                              socket.ntohs(k.dport), k.prefixlen - 80)


IPCACHE: Codec[IPv4Network, planning.IpcacheValue] = Codec(
    "cy_ipcache", IpcacheKeyC, IpcacheValueC, _enc_ipcache_key, _dec_ipcache_key,
    lambda v: IpcacheValueC(v.identity, v.flags), lambda c: planning.IpcacheValue(c.identity, c.flags))

ENDPOINTS: Codec[IPv4Address, planning.EndpointValue] = Codec(
    "cy_endpoints", EndpointKeyC, EndpointInfoC,
    lambda ip: EndpointKeyC(addr_to_u32(ip)), lambda c: u32_to_addr(c.addr),
    lambda v: EndpointInfoC(v.ep_id, v.identity, v.flags, v.ifindex, v.revision),
    lambda c: planning.EndpointValue(c.ep_id, c.identity, c.flags, c.ifindex, c.revision))


EP_IFINDEX: Codec[int, IPv4Address] = Codec(
    "cy_ep_ifindex", IfindexKeyC, PodAddrC, lambda i: IfindexKeyC(i), lambda c: int(c.ifindex),
    lambda ip: PodAddrC(addr_to_u32(ip)), lambda c: u32_to_addr(c.addr))


def _policy_codec(name: str) -> Codec[planning.PolicyKey, planning.PolicyValue]:
    return Codec(name, PolicyKeyC, PolicyValueC, encode_policy_key, decode_policy_key,
                 lambda v: PolicyValueC(v.cookie, v.flags, v.proxy_port),
                 lambda c: planning.PolicyValue(c.cookie, c.flags, c.proxy_port))


POLICY = _policy_codec("cy_policy")
POLICY_DENY = _policy_codec("cy_policy_deny")


class PodNetnsKeyC(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64)]


class PodNetnsValueC(ct.Structure):
    _fields_ = [("addr", ct.c_uint32)]


POD_NETNS: Codec[int, IPv4Address] = Codec(
    "cy_lb4_podns", PodNetnsKeyC, PodNetnsValueC, PodNetnsKeyC, lambda k: int(k.cookie),
    lambda ip: PodNetnsValueC(addr_to_u32(ip)), lambda v: u32_to_addr(v.addr))
"""cy_lb4_podns (include/lb_trail_maps.h): a pod's network namespace cookie -> its IPv4."""
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH = 1, 9
TRAIL_MAPS = {"cy_lb4_trail": (BPF_MAP_TYPE_LRU_HASH, 16, 16, 16384), "cy_lb4_podns": (BPF_MAP_TYPE_HASH, 8, 4, 16384)}
"""The maps of include/lb_trail_maps.h (type, key size, value size, CY_LB_TRAIL_MAX / CY_LB_PODNS_MAX), shared by the
pod programs and the socket programs: ``loading.ensure_pinned_maps`` creates them before either compiles."""

# ---------------------------------------------------------------- raw map access


def read_map(fd: int, codec: Codec[K, V], *, limit: int = 10_000_000) -> dict[K, V]:
    """Every entry of the map behind ``fd`` (bounded by ``limit``)."""
    lib = libbpf.lib
    out: dict[K, V] = {}
    key = codec.key_c()
    nxt = codec.key_c()
    value = codec.value_c()
    first = True
    for _ in range(limit):
        if lib.bpf_map_get_next_key(fd, None if first else ct.byref(key), ct.byref(nxt)) < 0:
            break
        first = False
        if lib.bpf_map_lookup_elem(fd, ct.byref(nxt), ct.byref(value)) == 0:
            out[codec.decode_key(codec.key_c.from_buffer_copy(nxt))] = codec.decode_value(
                codec.value_c.from_buffer_copy(value))
        ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
    return out


def count_entries(fd: int, key_c: type[ct.Structure] | type[ct.c_uint32], *, limit: int = 10_000_000) -> int:
    """How many keys the map behind ``fd`` holds (bounded by ``limit``)."""
    key, nxt = key_c(), key_c()
    count = 0
    while count < limit and libbpf.lib.bpf_map_get_next_key(fd, ct.byref(key) if count else None,
                                                             ct.byref(nxt)) == 0:
        count += 1
        ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
    return count


PerCpuValue = TypeVar("PerCpuValue", bound=ct.Structure)


def read_percpu(fd: int, index: int, value_c: type[PerCpuValue]) -> list[PerCpuValue]:
    """One CPU's value per possible CPU of element ``index`` of a per-CPU array (zeros if absent)."""
    cpus = libbpf.possible_cpus()
    stride = (ct.sizeof(value_c) + 7) // 8 * 8  # the kernel rounds per-CPU values up to 8 bytes
    buf = ct.create_string_buffer(stride * cpus)
    key = ct.c_uint32(index)
    if libbpf.lib.bpf_map_lookup_elem(fd, ct.byref(key), buf) != 0:
        return [value_c() for _ in range(cpus)]
    return [value_c.from_buffer_copy(buf, cpu * stride) for cpu in range(cpus)]


def sync_map(fd: int, codec: Codec[K, V], wanted: Mapping[K, V]) -> None:
    """Make a small map hold exactly ``wanted`` (read it, delete the rest, write what differs)."""
    have = read_map(fd, codec)
    for key in have.keys() - wanted.keys():
        _delete(fd, codec, key)
    for key, value in wanted.items():
        if have.get(key) != value:
            _update(fd, codec, key, value)


def _update(fd: int, codec: Codec[K, V], key: K, value: V) -> None:
    res = libbpf.lib.bpf_map_update_elem(fd, ct.byref(codec.encode_key(key)), ct.byref(codec.encode_value(value)), 0)
    if res < 0:
        err = libbpf.last_errno(res)
        raise errors.MapWriteFailed(codec.name, key, err, os.strerror(err))


def _delete(fd: int, codec: Codec[K, V], key: K) -> None:
    res = libbpf.lib.bpf_map_delete_elem(fd, ct.byref(codec.encode_key(key)))
    if res < 0:
        err = libbpf.last_errno(res)
        if err != errno_mod.ENOENT:
            raise errors.MapWriteFailed(codec.name, key, err, os.strerror(err))


@dataclasses.dataclass
class UndoLog:
    """Writes done so far, to restore the previous contents if a later write fails."""

    steps: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def rollback(self) -> None:
        for step in reversed(self.steps):
            try:
                step()
            except errors.MapWriteFailed:
                continue  # best effort: the map keeps what could not be restored
        self.steps.clear()


def check_capacity(codec: Codec[K, V], observed: Mapping[K, V], diff: planning.MapDiff[K, V],
                   capacity: int) -> None:
    new = sum(1 for k in diff.upserts if k not in observed)
    wanted = len(observed) - len(diff.deletes) + new
    peak = len(observed) + new  # upserts are written before deletes
    if wanted > capacity:
        raise errors.MapFull(codec.name, wanted, capacity)
    if peak > capacity:
        raise errors.MapFull(codec.name, peak, capacity)


def apply_upserts(fd: int, codec: Codec[K, V], observed: Mapping[K, V], diff: planning.MapDiff[K, V],
                  undo: UndoLog) -> None:
    for key, value in diff.upserts.items():
        old = observed.get(key)
        _update(fd, codec, key, value)
        if old is None:
            undo.steps.append(functools.partial(_delete, fd, codec, key))
        else:
            undo.steps.append(functools.partial(_update, fd, codec, key, old))


def apply_deletes(fd: int, codec: Codec[K, V], observed: Mapping[K, V], diff: planning.MapDiff[K, V],
                  undo: UndoLog) -> None:
    for key in diff.deletes:
        old = observed[key]
        _delete(fd, codec, key)
        undo.steps.append(functools.partial(_update, fd, codec, key, old))
