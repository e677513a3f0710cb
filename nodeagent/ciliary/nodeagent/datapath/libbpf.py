"""ctypes bindings to the system libbpf (``libbpf.so.1``): everything the agent process does with bpf objects.

Used by ``loading`` (pin, adopt, program/map info), ``maps`` (element syscalls),
``flows`` (the ring buffer) and the tests (:func:`prog_test_run`, BPF_PROG_TEST_RUN). It needs no compiler: the agent process never
imports bcc, whose LLVM/clang libraries alone cost ~55 MB of resident memory
once loaded (``compiler`` runs bcc in a short-lived child instead). Every
failure is an ``OSError`` carrying the errno and the object's path or fd.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import errno as errno_mod
import os
from collections.abc import Callable
from pathlib import Path

lib = ct.CDLL("libbpf.so.1", use_errno=True)
lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
lib.bpf_obj_get.argtypes = [ct.c_char_p]
lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
lib.libbpf_num_possible_cpus.argtypes = []
lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]


class TestRunOptsC(ct.Structure):
    """``struct bpf_test_run_opts`` (libbpf)."""

    __test__ = False  # not a pytest class
    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(TestRunOptsC)]

RingBufferSample = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
"""``ring_buffer_sample_fn``: (ctx, data, size) -> 0 to go on."""

lib.ring_buffer__new.argtypes = [ct.c_int, RingBufferSample, ct.c_void_p, ct.c_void_p]
lib.ring_buffer__new.restype = ct.c_void_p
lib.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
lib.ring_buffer__consume.argtypes = [ct.c_void_p]
lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
lib.ring_buffer__free.argtypes = [ct.c_void_p]
lib.ring_buffer__free.restype = None


def last_errno(result: int = 0) -> int:
    """The errno of a failed libbpf call (libbpf 1.x returns ``-errno`` and sets errno)."""
    return ct.get_errno() or (-result if result < 0 else 0) or errno_mod.EIO


def _checked(result: int, what: str) -> int:
    """``result`` of a libbpf call, or an ``OSError`` naming ``what`` when it failed (negative)."""
    if result < 0:
        err = last_errno(result)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# ---------------------------------------------------------------- pinned objects


def obj_pin(fd: int, path: Path) -> None:
    _checked(lib.bpf_obj_pin(fd, str(path).encode()), f"bpf_obj_pin {path}")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map's fd (the caller closes it)."""
    return int(_checked(lib.bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
                        f"bpf_map_create {name}"))


def obj_get(path: Path) -> int:
    """An fd for the object pinned at ``path`` (the caller closes it)."""
    return int(_checked(lib.bpf_obj_get(str(path).encode()), f"bpf_obj_get {path}"))


class _ProgInfoC(ct.Structure):
    """The head of ``struct bpf_prog_info`` (the kernel fills only what fits)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
                ("map_ids", ct.c_uint64)]


class _MapInfoC(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32)]


@dataclasses.dataclass(frozen=True)
class ProgInfo:
    id: int
    map_ids: tuple[int, ...]
    """Ids of the maps the program uses."""


@dataclasses.dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int


def _info(fd: int, info: ct.Structure) -> None:
    size = ct.c_uint32(ct.sizeof(info))
    _checked(lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), f"bpf_obj_get_info_by_fd (fd {fd})")


def prog_info(fd: int) -> ProgInfo:
    head = _ProgInfoC()
    _info(fd, head)
    ids = (ct.c_uint32 * max(head.nr_map_ids, 1))()
    info = _ProgInfoC(nr_map_ids=head.nr_map_ids, map_ids=ct.addressof(ids))
    _info(fd, info)
    return ProgInfo(int(info.id), tuple(int(i) for i in ids[: min(info.nr_map_ids, head.nr_map_ids)]))


def map_info(fd: int) -> MapInfo:
    info = _MapInfoC()
    _info(fd, info)
    return MapInfo(int(info.type), int(info.id), int(info.key_size), int(info.value_size), int(info.max_entries))


def possible_cpus() -> int:
    """Entries of a per-CPU map value (``libbpf_num_possible_cpus``)."""
    n = int(lib.libbpf_num_possible_cpus())
    if n <= 0:
        raise OSError(-n or errno_mod.EIO, "libbpf_num_possible_cpus failed")
    return n


SKB_CTX_IFINDEX_END = 44
"""``struct __sk_buff`` up to and including ``ifindex`` (offset 40): the context prog_test_run passes."""


def prog_test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0) -> int:
    """Run the program behind ``prog_fd`` once on ``packet`` (BPF_PROG_TEST_RUN); its return value.

    For a tc program ``packet`` is an Ethernet frame; the kernel builds an skb around it in
    the caller's network namespace, on the device ``ifindex`` of that namespace (``skb->ifindex``
    in the program; 0: the loopback device). The program's map writes and events are real.
    """
    buf = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    opts = TestRunOptsC(sz=ct.sizeof(TestRunOptsC), data_in=ct.addressof(buf), data_size_in=len(packet),
                        data_out=ct.addressof(out), data_size_out=len(out), repeat=1)
    ctx = ct.create_string_buffer(SKB_CTX_IFINDEX_END)
    if ifindex:
        ct.memmove(ct.addressof(ctx) + SKB_CTX_IFINDEX_END - 4, ct.byref(ct.c_uint32(ifindex)), 4)
        opts.ctx_in, opts.ctx_size_in = ct.addressof(ctx), SKB_CTX_IFINDEX_END
    _checked(lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), f"bpf_prog_test_run_opts (fd {prog_fd})")
    return int(opts.retval)


# ---------------------------------------------------------------- ring buffer


class RingBuffer:
    """libbpf's consumer of one ``BPF_MAP_TYPE_RINGBUF`` map: ``sample(ctx, data, size)`` per record.

    ``data`` is valid only during the call (copy it); ``sample`` returns 0 to go on.
    Owns a dup of ``map_fd``.
    """

    def __init__(self, map_fd: int, sample: Callable[[int | None, int, int], int]) -> None:
        self._sample = RingBufferSample(sample)  # referenced for as long as libbpf may call it
        self._fd = os.dup(map_fd)
        self._rb = lib.ring_buffer__new(self._fd, self._sample, None, None)
        if not self._rb:
            err = last_errno()
            os.close(self._fd)
            raise OSError(err, f"ring_buffer__new (map fd {map_fd}): {os.strerror(err)}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records and consume them; records consumed (or -errno)."""
        return int(lib.ring_buffer__poll(self._rb, timeout_ms))

    def consume(self) -> int:
        """Consume what is there without waiting."""
        return int(lib.ring_buffer__consume(self._rb))

    def epoll_fd(self) -> int:
        return int(lib.ring_buffer__epoll_fd(self._rb))

    def close(self) -> None:
        if self._rb:
            lib.ring_buffer__free(self._rb)
            self._rb = None
            os.close(self._fd)
