"""Conntrack entries never outlive the endpoint that made them.

``cy_ct`` entries are keyed from the local pod's side (its address first) and carry the
``ep_id`` of the endpoint that opened them (``lib/conntrack.h``); a packet matching a live
entry in the reply direction passes without a policy lookup. When a pod goes away its entries
would otherwise stay until they expire (TCP: 6 h) or the LRU evicts them, and a new pod that
gets the same address could send a packet matching an old tuple and have it pass as a reply.
After every apply that removes an endpoint or gives an address to another endpoint (an address
behind a new host veth is a new endpoint: ``planning.allocate_endpoint_ids``), the
engine calls :func:`purge`: entries whose pod address is no endpoint of the node, or an
endpoint with another ``ep_id``, are deleted. :func:`stale_keys` is the pure decision.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Mapping
from typing import TypeVar

from ciliary.nodeagent.datapath import libbpf, maps

A = TypeVar("A")

CtRef = tuple[int, bytes]
"""(pod address as stored in the key, the raw key)."""

CONNTRACK: maps.Codec[CtRef, int] = maps.Codec(
    "cy_ct", maps.CtKeyC, maps.CtEntryC,
    lambda ref: maps.CtKeyC.from_buffer_copy(ref[1]),
    lambda c: (int(c.pod_addr), bytes(c)),
    lambda ep_id: maps.CtEntryC(0, ep_id, 0, 0),
    lambda c: int(c.ep_id))


def stale_keys(entries: Mapping[CtRef, int], endpoints: Mapping[int, int]) -> list[CtRef]:
    """Entries (ref -> ep_id) whose pod address is not an endpoint with that ep_id (address -> ep_id)."""
    return [ref for ref, ep_id in entries.items() if endpoints.get(ref[0]) != ep_id]


def endpoints_replaced(before: Mapping[A, int], after: Mapping[A, int]) -> bool:
    """Did an address leave, or change its ep_id, between two endpoint maps (address -> ep_id)?"""
    return any(after.get(addr) != ep_id for addr, ep_id in before.items())


def purge(ct_fd: int, endpoints: Mapping[int, int]) -> int:
    """Delete the stale entries of the map behind ``ct_fd``; returns how many were deleted."""
    stale = stale_keys(maps.read_map(ct_fd, CONNTRACK), endpoints)
    deleted = 0
    for _, raw in stale:
        key = maps.CtKeyC.from_buffer_copy(raw)
        if libbpf.lib.bpf_map_delete_elem(ct_fd, ct.byref(key)) == 0:
            deleted += 1  # ENOENT: expired and evicted meanwhile
    return deleted
