"""How the CLI reads what a node's datapath holds: ``GET /v1/datapath`` of the node's agent.

The agent is found through its registration in etcd (``/ciliary/nodes/v1/<node>``
carries its API address, as for ``ciliary observe``). :func:`read_datapaths` returns,
per node, the decoded ``NodeIntent`` the datapath enforces plus the agent's document,
or a string saying why it could not be read (no registration, no answer, an error
status): callers must show that, never the operator's intent in its place.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ciliary.cli import targets
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


async def _read_one(session: aiohttp.ClientSession, node: str, address: str | None) -> HeldState | str:
    if address is None:
        return "no agent is registered for the node (is it running?)"
    try:
        async with session.get(f"http://{address}/v1/datapath") as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                return f"the agent at {address} answered {resp.status}: {body.get('error', body)}"
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        return f"the agent at {address} did not answer: {exc or type(exc).__name__}"
    try:
        return HeldState(NodeIntent.model_validate(body["intent"]), body)
    except (KeyError, ValueError) as exc:
        return f"the agent at {address} sent an unreadable datapath view: {exc}"


async def read_datapaths(target: targets.EtcdTarget, nodes: Iterable[str]) -> dict[str, HeldState | str]:
    """Each node's datapath view, or why it could not be read."""
    wanted = sorted(set(nodes))
    addresses = await agent_addresses(target)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(_read_one(session, n, addresses.get(n)) for n in wanted))
    return dict(zip(wanted, results, strict=True))
