"""The etcd key layout shared by the operator, the agents and the CLI.

Every prefix carries a version segment, so a later layout can live beside this one.
Everything a node agent writes sits under a key or prefix of its own (reports are keyed
node first), so etcd's key and prefix permissions can confine each agent to its node
(``store.access``):

  /ciliary/nodes/v1/<node>                  agent registration, bound to its lease
  /ciliary/intents/v1/<node>                the NodeIntent the operator publishes
  /ciliary/lbintents/v2/<node>/manifest     the node's load-balancing intent: which shards make it up
  /ciliary/lbintents/v2/<node>/<shard>      one shard of it (``services.sharding``), both written by the operator
  /ciliary/identities/v1/id/<number>        identity -> its labels (allocation record)
  /ciliary/identities/v1/labels/<sha256>    labels -> identity (compare-and-swap index)
  /ciliary/reports/v1/<node>/<policy-uid>   per-policy enforcement report, bound to the agent lease
  /ciliary/status/v1/<node>                 per-node agent status (applied revision, errors)
"""

from __future__ import annotations

ROOT = "/ciliary"
NODES_PREFIX = f"{ROOT}/nodes/v1/"
INTENTS_PREFIX = f"{ROOT}/intents/v1/"
LB_INTENTS_PREFIX = f"{ROOT}/lbintents/v2/"
IDENTITIES_PREFIX = f"{ROOT}/identities/v1/"
IDENTITY_ID_PREFIX = f"{IDENTITIES_PREFIX}id/"
IDENTITY_LABELS_PREFIX = f"{IDENTITIES_PREFIX}labels/"
REPORTS_PREFIX = f"{ROOT}/reports/v1/"
NODE_STATUS_PREFIX = f"{ROOT}/status/v1/"


def _segment(value: str, what: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"{what} {value!r} cannot be used in an etcd key")
    return value


def node_key(node: str) -> str:
    return NODES_PREFIX + _segment(node, "node name")


def node_intent_key(node: str) -> str:
    return INTENTS_PREFIX + _segment(node, "node name")


def node_lb_intent_prefix(node: str) -> str:
    """Every key of ``node``'s load-balancing intent (and only of it: the slash keeps ``n1`` from ``n10``)."""
    return f"{LB_INTENTS_PREFIX}{_segment(node, 'node name')}/"


def node_lb_intent_key(node: str, part: str) -> str:
    """One key of ``node``'s load-balancing intent: its manifest or one of its shards."""
    return node_lb_intent_prefix(node) + _segment(part, "load-balancing intent part")


def lb_intent_part_from_key(key: str | bytes) -> tuple[str, str]:
    """``(node, part)`` of a key under :data:`LB_INTENTS_PREFIX`."""
    text = key.decode() if isinstance(key, bytes) else key
    if not text.startswith(LB_INTENTS_PREFIX):
        raise ValueError(f"key {text!r} is not under {LB_INTENTS_PREFIX!r}")
    node, _, part = text[len(LB_INTENTS_PREFIX):].partition("/")
    if not node or not part or "/" in part:
        raise ValueError(f"key {text!r} is not a load-balancing intent key")
    return node, part


def node_status_key(node: str) -> str:
    return NODE_STATUS_PREFIX + _segment(node, "node name")


def identity_id_key(identity: int) -> str:
    return f"{IDENTITY_ID_PREFIX}{identity}"


def identity_labels_key(labels_digest: str) -> str:
    return IDENTITY_LABELS_PREFIX + _segment(labels_digest, "labels digest")


def node_reports_prefix(node: str) -> str:
    """Every report of ``node`` (and only of it: the trailing slash keeps ``n1`` from matching ``n10``)."""
    return f"{REPORTS_PREFIX}{_segment(node, 'node name')}/"


def report_key(policy_uid: str, node: str) -> str:
    return node_reports_prefix(node) + _segment(policy_uid, "policy uid")


def report_from_key(key: str | bytes) -> tuple[str, str]:
    """``(policy uid, node)`` of a report key."""
    text = key.decode() if isinstance(key, bytes) else key
    if not text.startswith(REPORTS_PREFIX):
        raise ValueError(f"key {text!r} is not under {REPORTS_PREFIX!r}")
    node, _, uid = text[len(REPORTS_PREFIX):].partition("/")
    if not node or not uid or "/" in uid:
        raise ValueError(f"key {text!r} is not a report key")
    return uid, node


def node_from_key(prefix: str, key: str | bytes) -> str:
    """The trailing node name of a key under ``prefix``."""
    text = key.decode() if isinstance(key, bytes) else key
    if not text.startswith(prefix):
        raise ValueError(f"key {text!r} is not under {prefix!r}")
    return text[len(prefix):]
