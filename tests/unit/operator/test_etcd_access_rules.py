"""The etcd access rules (``store.access``): who may read and write which key, row by row.

The same rules run against a real etcd in ``tests/integration/store/test_etcd_access.py``.
"""

from __future__ import annotations

import pytest

from ciliary.operator.store import access, keyspace
from ciliary.operator.store.access import Grant, Permission

OWN, OTHER, PREFIXED = "node-1", "node-2", "node-10"  # node-1 is a string prefix of node-10

KEYS = {
    "own intent": keyspace.node_intent_key(OWN),
    "other intent": keyspace.node_intent_key(OTHER),
    "prefixed intent": keyspace.node_intent_key(PREFIXED),
    "own lb intent": keyspace.node_lb_intent_key(OWN, "manifest"),
    "own lb shard": keyspace.node_lb_intent_key(OWN, "s07"),
    "other lb intent": keyspace.node_lb_intent_key(OTHER, "manifest"),
    "prefixed lb intent": keyspace.node_lb_intent_key(PREFIXED, "manifest"),
    "prefixed lb shard": keyspace.node_lb_intent_key(PREFIXED, "s07"),
    "own registration": keyspace.node_key(OWN),
    "other registration": keyspace.node_key(PREFIXED),
    "own status": keyspace.node_status_key(OWN),
    "other status": keyspace.node_status_key(PREFIXED),
    "own report": keyspace.report_key("uid-1", OWN),
    "other report": keyspace.report_key("uid-1", PREFIXED),
    "identity": keyspace.identity_id_key(300),
    "identity index": keyspace.identity_labels_key("abc"),
    "leader key": f"{access.OPERATOR_PREFIX}v1/leader",
    "kubernetes": "/registry/pods/default/x",
}

# (read, write) per key class
NODE_MATRIX = {
    "own intent": (True, False),
    "other intent": (False, False),
    "prefixed intent": (False, False),
    "own lb intent": (True, False),
    "own lb shard": (True, False),
    "other lb intent": (False, False),
    "prefixed lb intent": (False, False),
    "prefixed lb shard": (False, False),
    "own registration": (True, True),
    "other registration": (False, False),
    "own status": (True, True),
    "other status": (False, False),
    "own report": (True, True),
    "other report": (False, False),
    "identity": (True, False),
    "identity index": (True, False),
    "leader key": (False, False),
    "kubernetes": (False, False),
}
OPERATOR_MATRIX = {
    "own intent": (True, True),
    "other intent": (True, True),
    "prefixed intent": (True, True),
    "own lb intent": (True, True),
    "own lb shard": (True, True),
    "other lb intent": (True, True),
    "prefixed lb intent": (True, True),
    "prefixed lb shard": (True, True),
    "own registration": (True, False),
    "other registration": (True, False),
    "own status": (True, False),
    "other status": (True, False),
    "own report": (True, False),
    "other report": (True, False),
    "identity": (True, True),
    "identity index": (True, True),
    "leader key": (True, True),
    "kubernetes": (False, False),
}

RELAY_MATRIX = {what: (what.endswith("registration"), False) for what in KEYS}
"""The Hubble relay reads the node registrations (their Observer API addresses) and nothing else."""


@pytest.mark.parametrize("what", sorted(KEYS))
def test_relay_role_matrix(what: str) -> None:
    role = access.relay_role()
    key = KEYS[what]
    assert (role.allows(key, write=False), role.allows(key, write=True)) == RELAY_MATRIX[what]
    assert role.user == access.RELAY_USER == "ciliary-relay"


READER_MATRIX = {what: (OPERATOR_MATRIX[what][0] and what != "leader key", False) for what in KEYS}
"""The command line's user reads what the operator reads but the election key, and writes nothing."""


@pytest.mark.parametrize("what", sorted(KEYS))
def test_reader_role_matrix(what: str) -> None:
    role = access.reader_role()
    key = KEYS[what]
    assert (role.allows(key, write=False), role.allows(key, write=True)) == READER_MATRIX[what]
    assert role.user == access.READER_USER == "ciliary-reader"


def test_the_reader_reads_every_key_the_cli_reads() -> None:
    """``ciliary policy get``/``trace``, ``observe`` and ``service list`` read these prefixes (ciliary.cli)."""
    role = access.reader_role()
    for key in (keyspace.node_intent_key("n1"), keyspace.node_key("n1"), keyspace.report_key("u", "n1"),
                keyspace.node_lb_intent_key("n1", "manifest"), keyspace.node_status_key("n1")):
        assert role.allows(key, write=False) and not role.allows(key, write=True), key


@pytest.mark.parametrize("what", sorted(KEYS))
def test_node_role_matrix(what: str) -> None:
    role = access.node_role(OWN)
    key = KEYS[what]
    assert (role.allows(key, write=False), role.allows(key, write=True)) == NODE_MATRIX[what]


@pytest.mark.parametrize("what", sorted(KEYS))
def test_operator_role_matrix(what: str) -> None:
    role = access.operator_role()
    key = KEYS[what]
    assert (role.allows(key, write=False), role.allows(key, write=True)) == OPERATOR_MATRIX[what]


def test_node_user_names_and_their_cn() -> None:
    assert access.node_user("node-1") == "ciliary-node-node-1"
    assert access.node_of_user("ciliary-node-node-1") == "node-1"
    assert access.node_of_user("ciliary-operator") is None
    assert access.node_role("node-1").user == access.node_role("node-1").name == "ciliary-node-node-1"
    for bad in ("", "Node-1", "a/b", "a b", "-x"):
        with pytest.raises(access.NodeNameError) as caught:
            access.node_user(bad)
        assert caught.value.node == bad


def test_grants_map_to_etcd_ranges() -> None:
    assert Grant(Permission.READ, "/a/b").range_end == ""  # one key, exact
    assert Grant(Permission.READ, "/a/b/", prefix=True).range_end == "/a/b0"  # '/' + 1 == '0'
    assert access.prefix_range_end("/ciliary/reports/v1/node-1/") == "/ciliary/reports/v1/node-10"
    # the per-node report prefix ends before node-10's reports begin
    own = Grant(Permission.READWRITE, keyspace.node_reports_prefix("node-1"), prefix=True)
    assert not own.covers(keyspace.report_key("u", "node-10"))
    assert own.range_end <= keyspace.report_key("u", "node-10")


def test_a_nodes_lb_prefix_is_one_range_ending_before_a_longer_names() -> None:
    grant = next(g for g in access.node_role("node-1").grants if g.key.startswith(keyspace.LB_INTENTS_PREFIX))
    assert grant.prefix and grant.key == "/ciliary/lbintents/v2/node-1/"
    assert grant.range_end == "/ciliary/lbintents/v2/node-10"  # '/' + 1: node-10's keys start at the end
    assert not grant.covers(keyspace.node_lb_intent_key("node-10", "manifest"))
    assert not grant.covers(keyspace.LB_INTENTS_PREFIX + "node-1")  # no key without the slash either
    assert keyspace.lb_intent_part_from_key(keyspace.node_lb_intent_key("node-1", "s03")) == ("node-1", "s03")
    for bad in ("/ciliary/lbintents/v2/node-1", "/ciliary/lbintents/v2/node-1/", "/ciliary/lbintents/v2/a/b/c"):
        with pytest.raises(ValueError):
            keyspace.lb_intent_part_from_key(bad)


def test_report_keys_are_node_first_and_parse_back() -> None:
    key = keyspace.report_key("uid-7", "node-3")
    assert key == "/ciliary/reports/v1/node-3/uid-7"
    assert keyspace.report_from_key(key) == ("uid-7", "node-3")
    assert keyspace.report_from_key(key.encode()) == ("uid-7", "node-3")
    for bad in ("/ciliary/reports/v1/node-3", "/ciliary/reports/v1/node-3/", "/ciliary/intents/v1/x/y"):
        with pytest.raises(ValueError):
            keyspace.report_from_key(bad)
