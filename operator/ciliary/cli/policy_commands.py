"""``ciliary policy get|trace``: what a node's datapath enforces, and why a packet would pass or not.

Both answer from what the kernel holds: each involved node's agent decodes its pinned
maps (``GET /v1/datapath``, ``datapath_client``) and ``trace`` runs the same
``evaluate_entries`` on those entries. The operator's published NodeIntent (etcd) is
read too, to say where the datapath differs from it (an intent the node could not
apply, a node still catching up). A node whose agent cannot be read is reported as
such (``get`` fails, ``trace`` says UNKNOWN and exits 2); the intent is never shown in
its place. ``get --intent`` prints the published intent, labelled as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import yaml

from ciliary.cli import agent_access, datapath_client, policy_listing, targets
from ciliary.cli.errors import UserError
from ciliary.operator.intents import IntentSchemaError, NodeIntent, parse_node_intent
from ciliary.operator.policy import divergence, tracing
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdUnavailableError


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="show enforced policy and trace verdicts",
                            description="Inspect what each node's datapath enforces (read from its maps through "
                                        "its agent, compared with the operator's intent), and trace single "
                                        "packets through it.")
    cmds = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    get = cmds.add_parser("get", help="print the policy entries a node's datapath holds",
                          description="Print what the node's datapath holds, read from its pinned maps by its "
                                      "agent: its endpoints with identities and enforced directions, their allow "
                                      "and deny entries per direction, the ipcache; and where that differs from "
                                      "the intent the operator published for the node. Fails when the agent "
                                      "cannot be read. With --intent: the published intent instead.")
    get.add_argument("--node", help="node name, e.g. node-1")
    get.add_argument("--kind", choices=["NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"],
                     help="instead of a node's entries: list the policies of this kind that select pods, with "
                          "their per-node enforcement from the agents' reports (how a NetworkPolicy, which has "
                          "no status, shows where it is enforced)")
    get.add_argument("--intent", action="store_true",
                     help="print the intent the operator published (not what the datapath holds)")
    get.add_argument("-o", "--output", choices=["yaml", "json", "table"], default=None,
                     help="output format (default: yaml; table for --kind)")
    targets.add_etcd_arguments(get)
    agent_access.add_arguments(get)
    get.set_defaults(func=_get)

    tr = cmds.add_parser("trace", help="would a packet from SRC to DST pass, and which rule decides?",
                         description="Evaluate one packet on the entries the nodes' datapaths hold (read from "
                                     "their maps by their agents), as the datapath does: the source endpoint's "
                                     "egress on its node, then the destination endpoint's ingress on its node. "
                                     "Prints ALLOWED or DENIED and the deciding rule (kind, namespace, name, rule "
                                     "index), or that default deny applied, and warns where the datapath differs "
                                     "from the operator's intent. Exits 0 with a verdict; 2 with UNKNOWN when a "
                                     "node's datapath could not be read.")
    tr.add_argument("--src", required=True, help="[NAMESPACE/]POD or IPv4 address")
    tr.add_argument("--dst", required=True, help="[NAMESPACE/]POD or IPv4 address")
    tr.add_argument("--dport", required=True, help="PORT/PROTO, e.g. 80/tcp, 53/udp, 8/icmp (ICMP type)")
    tr.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    targets.add_etcd_arguments(tr)
    agent_access.add_arguments(tr)
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


def _access(args: argparse.Namespace) -> agent_access.AgentAccess:
    try:
        return agent_access.AgentAccess.from_args(args, timeout_s=datapath_client.TIMEOUT_S)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _get(args: argparse.Namespace) -> int:
    if (args.node is None) == (args.kind is None):
        raise UserError("give exactly one of --node NODE and --kind KIND")
    if args.kind is None and args.output == "table":
        raise UserError("-o table is for --kind listings")
    target = targets.etcd_target(args)
    if args.kind is not None:
        return _list(target, args.kind, args.output or "table")
    published = asyncio.run(load_intents(target, args.node))
    if args.intent:
        if args.node not in published:
            raise UserError(f"no intent published for node {args.node!r} (is the operator running? "
                            "is the node name right?)")
        data: dict[str, Any] = {"node": args.node, "source": "operator intent (not read from the datapath)",
                                **published[args.node].public_dump()}
    else:
        held = asyncio.run(datapath_client.read_datapaths(target, [args.node], _access(args)))[args.node]
        if isinstance(held, str):
            raise UserError(f"cannot read the datapath of node {args.node!r}: {held}. Not showing the operator's "
                            "intent in its place (--intent prints what was published)")
        wanted = published.get(args.node)
        diffs = divergence.differences(wanted, held.intent) if wanted is not None else [
            "the operator published no intent for this node"]
        doc = held.document
        data = {"node": args.node, "source": "datapath", "agent": held.via, "appliedRevision": doc.get("appliedRevision"),
                "publishedRevision": wanted.revision if wanted is not None else None,
                "agentError": doc.get("error", ""), "differences": diffs,
                "endpoints": [e.model_dump(mode="json") for e in held.intent.endpoints],
                "ipcache": [e.model_dump(mode="json") for e in held.intent.ipcache],
                "maps": {"endpoints": doc.get("endpoints", []), "inactive": doc.get("inactive", []),
                         "orphaned": doc.get("orphaned", []), "unrepresentable": doc.get("unrepresentable", [])}}
        if diffs:
            print(f"ciliary: WARNING: the datapath of {args.node} differs from the operator's intent "
                  f"({len(diffs)} differences, listed under 'differences')", file=sys.stderr)
    print(json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _list(target: targets.EtcdTarget, kind: str, output: str) -> int:
    rows = policy_listing.summarise(asyncio.run(load_intents(target)),
                                    asyncio.run(policy_listing.load_reports(target)), kind)
    if output == "table":
        print(policy_listing.render(rows), end="")
        return 0
    data = [{"kind": r.kind, "namespace": r.namespace, "name": r.name, "uid": r.uid, "generation": r.generation,
             "enforcement": r.enforcement, "enforcing": list(r.enforcing),
             "notEnforcing": {node: why for node, why in r.problems}} for r in rows]
    print(json.dumps(data, indent=2) if output == "json" else yaml.safe_dump(data, sort_keys=False), end="")
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
    target = targets.etcd_target(args)
    published = asyncio.run(load_intents(target))
    if not published:
        raise UserError("no intents published yet (is the operator running?)")
    src, dst = _qualify(args.src), _qualify(args.dst)
    try:
        nodes = tracing.involved_nodes(published, src, dst)
        held = asyncio.run(datapath_client.read_datapaths(target, nodes, _access(args)))
        result = tracing.trace_datapath(published, {n: h if isinstance(h, str) else h.intent for n, h in held.items()},
                                        src, dst, port, proto or "tcp")
    except tracing.TraceError as exc:
        raise UserError(str(exc)) from exc
    if args.output == "json":
        print(json.dumps({
            "verdict": result.verdict, "source": "datapath", "sourceIdentity": result.source_identity,
            "destinationIdentity": result.destination_identity,
            "directions": [_direction_json(d) for d in result.directions],
            "intentVerdict": result.intent.verdict, "differences": list(result.differences),
            "unreachable": dict(result.unreachable),
            "agents": {n: h.via for n, h in sorted(held.items()) if not isinstance(h, str)},
        }, indent=2))
    else:
        print(result.describe())
        for node, h in sorted(held.items()):
            if not isinstance(h, str):
                print(f"  {node}'s datapath read by its agent {h.via}")
    return 2 if result.verdict == "UNKNOWN" else 0


def _direction_json(d: tracing.DatapathDirection) -> dict[str, Any]:
    out: dict[str, Any] = {"direction": d.direction.value, "node": d.node, "endpoint": d.endpoint, "source": d.source,
                           "verdict": d.verdict, "error": d.error,
                           "intentVerdict": d.intent.verdict if d.intent is not None else None}
    if d.trace is not None:
        out.update(peerIdentity=d.trace.peer_identity, reason=d.trace.reason,
                   rules=[r.model_dump(mode="json") for r in d.trace.rules])
    return out
