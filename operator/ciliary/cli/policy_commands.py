"""``ciliary policy get|trace``: what a node enforces, and why a packet would pass or not.

Both read the NodeIntents the operator published in etcd: exactly the entries
the datapath of each node holds, so ``trace`` explains the datapath's verdict
rather than re-implementing policy semantics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import yaml

from ciliary.cli import targets
from ciliary.cli.errors import UserError
from ciliary.operator.intents import IntentSchemaError, NodeIntent, parse_node_intent
from ciliary.operator.policy import tracing
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdUnavailableError


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="show resolved policy and trace verdicts",
                            description="Inspect what the operator published for each node: the resolved "
                                        "policy entries the datapath enforces, and traces of single packets.")
    cmds = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    get = cmds.add_parser("get", help="print the resolved intent of a node",
                          description="Print the NodeIntent the operator published for a node: its endpoints "
                                      "with identities, their policy entries per direction, the ipcache.")
    get.add_argument("--node", required=True, help="node name, e.g. node-1")
    get.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml", help="output format")
    targets.add_etcd_arguments(get)
    get.set_defaults(func=_get)

    tr = cmds.add_parser("trace", help="would a packet from SRC to DST pass, and which rule decides?",
                         description="Evaluate one packet against the published entries exactly as the "
                                     "datapath does: the source endpoint's egress on its node, then the "
                                     "destination endpoint's ingress on its node. Prints ALLOWED or DENIED "
                                     "and the deciding rule (kind, namespace, name, rule index), or that "
                                     "default deny applied. Exits 0 either way.")
    tr.add_argument("--src", required=True, help="[NAMESPACE/]POD or IPv4 address")
    tr.add_argument("--dst", required=True, help="[NAMESPACE/]POD or IPv4 address")
    tr.add_argument("--dport", required=True, help="PORT/PROTO, e.g. 80/tcp, 53/udp, 8/icmp (ICMP type)")
    tr.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    targets.add_etcd_arguments(tr)
    tr.set_defaults(func=_trace)


async def load_intents(target: targets.EtcdTarget, node: str | None = None) -> dict[str, NodeIntent]:
    store = target.store(attempts=3)
    try:
        if node is not None:
            got = await store.get(keyspace.node_intent_key(node).encode())
            rows = [(node, got.value)] if got is not None else []
        else:
            rows = [(keyspace.node_from_key(keyspace.INTENTS_PREFIX, kv.key), kv.value)
                    for kv in await store.get_prefix(keyspace.INTENTS_PREFIX.encode())]
    except EtcdUnavailableError as exc:
        raise UserError(str(exc)) from exc
    finally:
        await store.close()
    try:
        return {name: parse_node_intent(name, value) for name, value in rows}
    except IntentSchemaError as exc:
        raise UserError(str(exc)) from exc


def _get(args: argparse.Namespace) -> int:
    intents = asyncio.run(load_intents(targets.etcd_target(args), args.node))
    if args.node not in intents:
        raise UserError(f"no intent published for node {args.node!r} (is the operator running? "
                        "is the node name right?)")
    data = intents[args.node].model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _qualify(name: str) -> str:
    if "/" in name or name.replace(".", "").isdigit():
        return name
    return f"default/{name}"


def _trace(args: argparse.Namespace) -> int:
    port_text, _, proto = args.dport.partition("/")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"--dport {args.dport!r}: expected PORT/PROTO such as 80/tcp") from None
    if not 0 <= port <= 65535:
        raise UserError(f"--dport {args.dport!r}: port must be 0-65535")
    intents = asyncio.run(load_intents(targets.etcd_target(args)))
    if not intents:
        raise UserError("no intents published yet (is the operator running?)")
    try:
        result = tracing.trace(intents, _qualify(args.src), _qualify(args.dst), port, proto or "tcp")
    except tracing.TraceError as exc:
        raise UserError(str(exc)) from exc
    if args.output == "json":
        print(json.dumps({
            "verdict": result.verdict, "sourceIdentity": result.source_identity,
            "destinationIdentity": result.destination_identity,
            "directions": [{"direction": p.direction.value, "node": p.node, "endpoint": p.endpoint,
                            "peerIdentity": p.peer_identity, "verdict": p.verdict, "reason": p.reason,
                            "rules": [r.model_dump(mode="json") for r in p.rules]}
                           for p in (result.egress, result.ingress) if p is not None],
        }, indent=2))
    else:
        print(result.describe())
    return 0
