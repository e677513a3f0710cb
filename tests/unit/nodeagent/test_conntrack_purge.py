"""Which conntrack entries outlived their endpoint (``datapath.conntrack_purge``, pure part)."""

from __future__ import annotations

from ciliary.nodeagent.datapath.conntrack_purge import endpoints_replaced, stale_keys


def test_entries_of_gone_or_replaced_endpoints_are_stale() -> None:
    entries = {(1, b"a-1"): 10, (1, b"a-2"): 10, (2, b"b-1"): 20, (3, b"c-1"): 30}
    endpoints = {1: 10, 2: 21}  # 2 now belongs to another endpoint, 3 is gone
    assert sorted(stale_keys(entries, endpoints)) == [(2, b"b-1"), (3, b"c-1")]


def test_only_a_removed_or_reassigned_address_calls_for_a_purge() -> None:
    assert not endpoints_replaced({"a": 1}, {"a": 1, "b": 2})  # a new endpoint: nothing to purge
    assert endpoints_replaced({"a": 1, "b": 2}, {"a": 1})
    assert endpoints_replaced({"a": 1}, {"a": 3})
    assert not endpoints_replaced({}, {})
