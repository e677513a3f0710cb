"""How the CLI reads what a node's datapath holds: ``GET /v1/datapath`` of the node's agent.

The agent is found through its registration in etcd (``/ciliary/nodes/v1/<node>``
carries its API address, as for ``ciliary observe``) and reached as ``agent_access``
says (directly, or through its pod when the address is the node's own loopback); an
answer that does not name the node (document and decoded intent) is refused.
:func:`read_datapaths` returns, per node, the decoded ``NodeIntent`` the datapath
enforces plus the agent's document and how it was reached, or a string saying why it
could not be read (no registration, no answer, another node's agent, an error status):
callers must show that, never the operator's intent in its place.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ciliary.cli import agent_access, targets
from ciliary.cli.errors import UserError
from ciliary.operator.intents import NodeIntent
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdUnavailableError

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HeldState:
    """One node's datapath as its agent decoded it."""

    intent: NodeIntent
    document: dict[str, Any]
    via: str
    """How the agent was reached (``at http://...`` or ``in pod ... on node ...``)."""


async def agent_addresses(target: targets.EtcdTarget) -> dict[str, str]:
    """node -> the agent's API address, from the registrations in etcd."""
    store = target.store(attempts=3)
    try:
        rows = await store.get_prefix(keyspace.NODES_PREFIX.encode())
    except EtcdUnavailableError as exc:
        raise UserError(str(exc)) from exc
    finally:
        await store.close()
    out: dict[str, str] = {}
    for kv in rows:
        try:
            address = json.loads(kv.value).get("healthAddr")
        except (ValueError, AttributeError):
            continue
        if address:
            out[keyspace.node_from_key(keyspace.NODES_PREFIX, kv.key)] = address
    return out


async def _read_one(access: agent_access.AgentAccess, session: aiohttp.ClientSession, node: str,
                    address: str | None) -> HeldState | str:
    try:
        answer = await access.get_json(session, node, address, "/v1/datapath")
    except agent_access.AgentUnreachableError as exc:
        return str(exc)
    body = answer.body
    if answer.status != 200:
        return f"the agent {answer.via} answered {answer.status}: {body.get('error', body)}"
    try:
        intent = NodeIntent.model_validate(body["intent"])
    except (KeyError, ValueError) as exc:
        return f"the agent {answer.via} sent an unreadable datapath view: {exc}"
    if intent.node != node:
        return str(agent_access.WrongAgentError(node, intent.node, answer.via))
    return HeldState(intent, body, answer.via)


async def read_datapaths(target: targets.EtcdTarget, nodes: Iterable[str],
                         access: agent_access.AgentAccess | None = None) -> dict[str, HeldState | str]:
    """Each node's datapath view, or why it could not be read."""
    wanted = sorted(set(nodes))
    addresses = await agent_addresses(target)
    access = access or agent_access.AgentAccess(timeout_s=TIMEOUT_S)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(_read_one(access, session, n, addresses.get(n)) for n in wanted))
    return dict(zip(wanted, results, strict=True))
