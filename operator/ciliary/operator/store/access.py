"""Who may read and write which etcd keys: the roles of the operator and of each node agent.

The one place the access rules live. Pure: it computes :class:`Grant` lists and user/role
names; the lab (``ciliary.lab.etcdsecurity``) and the chart path turn them into etcd users and
roles. With etcd's ``--client-cert-auth`` and authentication on, etcd takes the user name
from the client certificate's common name, so a component's certificate CN *is* its user.

* The operator reads and writes the intents (policy and load balancing), the identities and its election keys, and
  reads the node registrations, the per-node statuses and the policy reports.
* The Hubble relay (:func:`relay_role`) reads the node registrations (each names its Observer API
  address) and nothing else.
* The command line (:func:`reader_role`, user ``ciliary-reader``: ``ciliary policy get``/``trace``,
  ``ciliary observe``, ``ciliary service list``) reads what the operator reads and writes (intents,
  identities, registrations, statuses, reports) and writes nothing: a person debugging a policy holds no
  key that could change enforcement.
* The agent of node ``N`` (user :func:`node_user`) reads only its own intents (policy and load
  balancing) and the
  shared identities (its load-balancing intent is every key under ``/ciliary/lbintents/v2/N/``);
  it writes only its own registration, its own status and the reports under its own prefix
  (``/ciliary/reports/v1/N/``).

A grant on a single key is exact (no range end), so node ``n1`` never matches ``n10``;
per-node prefixes end with ``/`` for the same reason.

:func:`shared_agents_role` is weaker and exists only for the Helm chart's opt-out
``etcd.nodeEnrollment.enabled=false`` (by default each node enrolls for its own certificate):
one user for every agent, confined to the keys agents write and to reading intents and
identities (no intent or identity write), but not to its node.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from ciliary.operator.store import keyspace

ROOT_USER = "root"
"""etcd requires a ``root`` user with the ``root`` role before authentication can be enabled."""
OPERATOR_USER = "ciliary-operator"
NODE_USER_PREFIX = "ciliary-node-"
SHARED_AGENTS_USER = "ciliary-agents"
"""The chart's shared agent user when per-node enrollment is off (see :func:`shared_agents_role`)."""
RELAY_USER = "ciliary-relay"
"""The Hubble relay's user (``ciliary-relay``): it reads the node registrations only."""
READER_USER = "ciliary-reader"
"""The command line's user (``ciliary-reader``): reads intents, identities and what agents write; writes nothing."""
OPERATOR_PREFIX = f"{keyspace.ROOT}/operator/"
"""The operator's own keys (the leader election key lives here)."""

_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class Permission(enum.Enum):
    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


@dataclass(frozen=True)
class Grant:
    """``permission`` on ``key`` alone, or on every key starting with it when ``prefix``."""

    permission: Permission
    key: str
    prefix: bool = False

    @property
    def range_end(self) -> str:
        """etcd's range end: empty for one key, else the prefix with its last byte incremented."""
        return prefix_range_end(self.key) if self.prefix else ""

    def covers(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    def allows(self, key: str, *, write: bool) -> bool:
        wanted = Permission.WRITE if write else Permission.READ
        return self.covers(key) and self.permission in (wanted, Permission.READWRITE)


@dataclass(frozen=True)
class Role:
    """An etcd role and the user holding it (one user per role, named alike)."""

    name: str
    user: str
    grants: tuple[Grant, ...]

    def allows(self, key: str, *, write: bool) -> bool:
        return any(g.allows(key, write=write) for g in self.grants)


class NodeNameError(ValueError):
    """A node name that cannot name an etcd user and key (carries the name)."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node name {node!r} is not a DNS subdomain; it cannot name an etcd user")
        self.node = node


def prefix_range_end(prefix: str) -> str:
    raw = prefix.encode()
    if not raw or raw[-1] == 0xFF:
        raise ValueError(f"cannot compute a range end for {prefix!r}")
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def node_user(node: str) -> str:
    """The etcd user (and client-certificate CN) of the agent on ``node``."""
    if not _NODE_NAME.match(node):
        raise NodeNameError(node)
    return NODE_USER_PREFIX + node


def node_of_user(user: str) -> str | None:
    """The node a user name belongs to, or None when it is not a node user."""
    if not user.startswith(NODE_USER_PREFIX):
        return None
    node = user[len(NODE_USER_PREFIX):]
    return node if _NODE_NAME.match(node) else None


def operator_role() -> Role:
    rw, r = Permission.READWRITE, Permission.READ
    return Role(name=OPERATOR_USER, user=OPERATOR_USER, grants=(
        Grant(rw, keyspace.INTENTS_PREFIX, prefix=True),
        Grant(rw, keyspace.LB_INTENTS_PREFIX, prefix=True),
        Grant(rw, keyspace.IDENTITIES_PREFIX, prefix=True),
        Grant(rw, OPERATOR_PREFIX, prefix=True),
        Grant(r, keyspace.NODES_PREFIX, prefix=True),
        Grant(r, keyspace.NODE_STATUS_PREFIX, prefix=True),
        Grant(r, keyspace.REPORTS_PREFIX, prefix=True),
    ))


def relay_role() -> Role:
    return Role(name=RELAY_USER, user=RELAY_USER, grants=(Grant(Permission.READ, keyspace.NODES_PREFIX, prefix=True),))


def reader_role() -> Role:
    r = Permission.READ
    return Role(name=READER_USER, user=READER_USER, grants=tuple(Grant(r, prefix, prefix=True) for prefix in (
        keyspace.INTENTS_PREFIX, keyspace.LB_INTENTS_PREFIX, keyspace.IDENTITIES_PREFIX, keyspace.NODES_PREFIX,
        keyspace.NODE_STATUS_PREFIX, keyspace.REPORTS_PREFIX)))


def node_role(node: str) -> Role:
    user = node_user(node)
    rw, r = Permission.READWRITE, Permission.READ
    return Role(name=user, user=user, grants=(
        Grant(r, keyspace.node_intent_key(node)),
        Grant(r, keyspace.node_lb_intent_prefix(node), prefix=True),
        Grant(r, keyspace.IDENTITIES_PREFIX, prefix=True),
        Grant(rw, keyspace.node_key(node)),
        Grant(rw, keyspace.node_status_key(node)),
        Grant(rw, keyspace.node_reports_prefix(node), prefix=True),
    ))


def shared_agents_role() -> Role:
    """Every agent under one user: agent keys of any node, read-only intents and identities (chart opt-out)."""
    rw, r = Permission.READWRITE, Permission.READ
    return Role(name=SHARED_AGENTS_USER, user=SHARED_AGENTS_USER, grants=(
        Grant(r, keyspace.INTENTS_PREFIX, prefix=True),
        Grant(r, keyspace.LB_INTENTS_PREFIX, prefix=True),
        Grant(r, keyspace.IDENTITIES_PREFIX, prefix=True),
        Grant(rw, keyspace.NODES_PREFIX, prefix=True),
        Grant(rw, keyspace.NODE_STATUS_PREFIX, prefix=True),
        Grant(rw, keyspace.REPORTS_PREFIX, prefix=True),
    ))
