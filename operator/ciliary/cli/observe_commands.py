"""``ciliary observe``: every verdict of the datapath, from one node or all of them.

Finds the agents through their registrations in etcd (``/ciliary/nodes/v1/<node>``
carries each agent's API address), reaches each as ``agent_access`` says (directly, or
through its pod when the address is the node's own loopback), asks each for its flows
(``GET /v1/flows``, filters applied by the agent), merges them by time and prints them
compact or as JSON lines. A flow (or counter) that names another node than the one
asked is refused: that node's answer is reported as unreadable, never shown. ``--follow`` keeps streaming from every node until interrupted. A node
whose agent does not answer is named on stderr; the others still print. The
agents count events they could not keep (``/v1/flows/stats``): ``--stats`` shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp

from ciliary.cli import agent_access, targets
from ciliary.cli.errors import UserError
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdUnavailableError

GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "observe", help="show flows: every verdict of the datapath, with the policy that decided it",
        description="Print flow events from the node agents: source and destination (pod, namespace, identity, "
                    "IP, port), protocol, TCP flags, verdict (FORWARDED / DROPPED), drop reason, direction, and "
                    "the policy rule that decided, where known. Filters are ANDed.",
        epilog="examples:\n  ciliary observe --verdict DROPPED\n  ciliary observe --pod default/deathstar --follow\n"
               "  ciliary observe --node node-2 --protocol tcp --port 80 -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", help="only this node's agent (default: all nodes)")
    p.add_argument("--pod", help="[NAMESPACE/]POD on either side")
    p.add_argument("--namespace", help="namespace on either side")
    p.add_argument("--verdict", choices=["FORWARDED", "DROPPED", "forwarded", "dropped"], help="verdict")
    p.add_argument("--protocol", help="tcp, udp, icmp or a number")
    p.add_argument("--port", type=int, help="port on either side (ICMP: the type)")
    p.add_argument("--direction", choices=["ingress", "egress"], help="from the local pod's point of view")
    p.add_argument("-o", "--output", choices=["compact", "json"], default="compact", help="output format")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new flows")
    p.add_argument("--last", type=int, default=20, help="how many recent flows per node (default 20)")
    p.add_argument("--stats", action="store_true", help="print each agent's seen/lost counters instead")
    targets.add_etcd_arguments(p)
    agent_access.add_arguments(p)
    p.set_defaults(func=_observe)


async def cluster_view(target: targets.EtcdTarget) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Agents' API addresses by node, and every endpoint's IP -> (namespace, pod) from the intents."""
    store = target.store(attempts=3)
    try:
        rows = await store.get_prefix(keyspace.NODES_PREFIX.encode())
        intents = await store.get_prefix(keyspace.INTENTS_PREFIX.encode())
    except EtcdUnavailableError as exc:
        raise UserError(str(exc)) from exc
    finally:
        await store.close()
    pods: dict[str, tuple[str, str]] = {}
    for kv in intents:
        try:
            for ep in json.loads(kv.value).get("endpoints", []):
                pods[ep["ipv4"]] = (ep["namespace"], ep["pod"])
        except (ValueError, KeyError, TypeError):
            continue
    out = {}
    for kv in rows:
        node = keyspace.node_from_key(keyspace.NODES_PREFIX, kv.key)
        try:
            address = json.loads(kv.value).get("healthAddr")
        except ValueError:
            continue
        if address:
            out[node] = address
    return out, pods


def name_peers(flow: dict[str, Any], pods: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Fill in pod names of remote peers (the agent knows only its own pods)."""
    for side in ("src", "dst"):
        peer = flow.get(side)
        if isinstance(peer, dict) and not peer.get("pod") and peer.get("ip") in pods:
            peer["namespace"], peer["pod"] = pods[peer["ip"]]
    return flow


def query(args: argparse.Namespace, pods: Mapping[str, tuple[str, str]] | None = None) -> dict[str, str]:
    q: dict[str, str] = {"last": str(max(0, args.last))}
    if args.pod and pods:
        # an agent knows only its own pods by name: match a pod by its IP so every node's view counts
        ns, _, name = args.pod.rpartition("/")
        wanted = (ns or "default", name)
        ip = next((ip for ip, who in pods.items() if who == wanted), None)
        if ip:
            q["ip"] = ip
            args = argparse.Namespace(**{**vars(args), "pod": None})
    for name in ("pod", "namespace", "protocol", "direction"):
        if getattr(args, name):
            q[name] = str(getattr(args, name))
    if args.verdict:
        q["verdict"] = args.verdict.upper()
    if args.port is not None:
        q["port"] = str(args.port)
    if args.follow:
        q["follow"] = "1"
    return q


def _side(side: Mapping[str, Any]) -> str:
    who = f"{side.get('namespace')}/{side['pod']}" if side.get("pod") else side.get("ip", "?")
    port = f":{side['port']}" if side.get("port") else ""
    return f"{who}{port} (ID:{side.get('identity', 0)})"


def compact(flow: Mapping[str, Any], color: bool) -> str:
    verdict = flow.get("verdict", "?")
    shown = verdict + (f" ({flow['drop_reason']})" if flow.get("drop_reason") else "")
    if color:
        shown = (RED if verdict == "DROPPED" else GREEN) + shown + RESET
    flags = f" [{','.join(flow['tcp_flags'])}]" if flow.get("tcp_flags") else ""
    rules = flow.get("policy") or []
    why = ""
    if rules:
        r = rules[0]
        where = f"{r.get('namespace')}/{r.get('name')}" if r.get("namespace") else r.get("name")
        why = f"  by {r.get('kind', '')} {where} rule {r.get('rule_index')} {r.get('section', '')}"
    l7 = flow.get("l7") or {}
    http = l7.get("http")
    if http:  # an L7 flow: the request the node's proxy judged
        flags = f" {http.get('protocol', 'HTTP')} {http.get('method', '')} {http.get('url', '')} => {http.get('code', 0)}"
    if l7.get("type") == "dns":
        ips = ",".join(l7.get("ips") or [])
        flags += f" DNS {l7.get('qtype', '')} {l7.get('query', '')} {l7.get('rcode', '')}" + (f" {ips}" if ips else "")
    time_text = str(flow.get("time", ""))[:23].replace("T", " ")
    arrow = "<-" if flow.get("is_reply") else "->"
    via = ""
    if flow.get("frontend"):  # opened through a Service frontend: the socket load balancer picked this backend
        via = f" via {flow.get('service') or 'frontend'} {flow['frontend']}"
    return (f"{time_text} {flow.get('node', '')}: {_side(flow.get('src', {}))} {arrow} {_side(flow.get('dst', {}))}"
            f"{via} {flow.get('protocol', '')}{flags} {flow.get('direction', '')} {shown}{why}")


async def _stream(access: agent_access.AgentAccess, session: aiohttp.ClientSession, node: str, address: str,
                  params: dict[str, str], out: asyncio.Queue[tuple[str, dict[str, Any] | None, str]]) -> None:
    lines = access.stream_lines(session, node, address, "/v1/flows", params, follow=params.get("follow") == "1")
    try:
        async with contextlib.aclosing(lines):
            async for via, line in lines:
                if not line.strip():
                    continue
                flow = json.loads(line)
                agent_access.check_node(node, flow, via)
                await out.put((node, flow, ""))
    except agent_access.AgentUnreachableError as exc:
        await out.put((node, None, str(exc)))
        return
    except ValueError as exc:
        await out.put((node, None, f"unreadable flow from the agent: {exc}"))
        return
    await out.put((node, None, ""))


async def run(args: argparse.Namespace) -> int:
    agents, pods = await cluster_view(targets.etcd_target(args))
    if args.node:
        if args.node not in agents:
            raise UserError(f"no agent registered for node {args.node!r} (registered: "
                            f"{', '.join(sorted(agents)) or 'none'})")
        agents = {args.node: agents[args.node]}
    if not agents:
        raise UserError("no node agent is registered in etcd (is the lab up?)")
    try:
        access = agent_access.AgentAccess.from_args(args, timeout_s=15)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    timeout = aiohttp.ClientTimeout(total=None if args.follow else 15, sock_connect=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if args.stats:
            for node, address in sorted(agents.items()):
                try:
                    print(json.dumps((await access.get_json(session, node, address, "/v1/flows/stats")).body))
                except agent_access.AgentUnreachableError as exc:
                    print(f"ciliary: {node}: {exc}", file=sys.stderr)
            return 0
        queue: asyncio.Queue[tuple[str, dict[str, Any] | None, str]] = asyncio.Queue()
        tasks = [asyncio.create_task(_stream(access, session, n, a, query(args, pods), queue)) for n, a in agents.items()]
        color = sys.stdout.isatty() and args.output == "compact"
        pending = len(tasks)
        backlog: list[dict[str, Any]] = []
        failed = 0
        try:
            while pending:
                node, flow, error = await queue.get()
                if flow is None:
                    pending -= 1
                    if error:
                        failed += 1
                        print(f"ciliary: {node}: {error}", file=sys.stderr)
                    continue
                name_peers(flow, pods)
                if args.follow:
                    _print(flow, args.output, color)
                else:
                    backlog.append(flow)
        finally:
            for task in tasks:
                task.cancel()
        for flow in sorted(backlog, key=lambda f: str(f.get("time", ""))):
            _print(flow, args.output, color)
    return 1 if failed == len(tasks) else 0


def _print(flow: Mapping[str, Any], output: str, color: bool) -> None:
    print(json.dumps(flow, sort_keys=True) if output == "json" else compact(flow, color), flush=True)


def _observe(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0
