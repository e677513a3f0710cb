"""``ciliary service list``: the frontends and backends each node's kernel holds (like ``cilium service list``).

Read from the LB maps by each node's agent (``GET /v1/services``), never from the operator's
intent: a node whose agent cannot be read is listed with the reason and the command exits 2.
Health-check node ports (``externalTrafficPolicy: Local``) follow with what they answer now.
Service problems (a targetPort naming no container port, a NodePort outside the range, more
backends than a frontend holds) are printed after the frontends, as the operator published them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp

from ciliary.cli import agent_access, datapath_client, targets
from ciliary.cli.errors import UserError

EXIT_UNREADABLE = 2


def register(sub: Any) -> None:
    service = sub.add_parser("service", help="show the Services each node load-balances",
                             description="Inspect socket load balancing: what each node's LB maps hold.")
    cmds = service.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    lst = cmds.add_parser("list", help="frontends -> backends per node, read from the kernel's maps",
                          description="List every frontend (address:port/protocol) and its backends in slot "
                                      "order, as the node's LB maps hold them (read by its agent), with the "
                                      "Service it belongs to and the Service problems the operator reported.")
    lst.add_argument("--node", help="only this node (default: every registered node)")
    lst.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    targets.add_etcd_arguments(lst)
    agent_access.add_arguments(lst)
    lst.set_defaults(func=_list)


async def _read(target: targets.EtcdTarget, node: str | None,
                access: agent_access.AgentAccess) -> dict[str, dict[str, Any] | str]:
    addresses = await datapath_client.agent_addresses(target)
    wanted = [node] if node else sorted(addresses)
    timeout = aiohttp.ClientTimeout(total=datapath_client.TIMEOUT_S, sock_connect=3)
    out: dict[str, dict[str, Any] | str] = {}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name in wanted:
            try:
                answer = await access.get_json(session, name, addresses.get(name), "/v1/services")
            except agent_access.AgentUnreachableError as exc:
                out[name] = str(exc)
                continue
            body = answer.body
            out[name] = body if answer.status == 200 else \
                f"the agent {answer.via} answered {answer.status}: {body.get('error', body)}"
    return out


def render_text(node: str, doc: dict[str, Any] | str) -> list[str]:
    if isinstance(doc, str):
        return [f"{node}: cannot read the load balancer: {doc}"]
    lines = [f"{node}:", f"  {'ID':>4}  {'FRONTEND':<24} {'SERVICE':<28} BACKENDS"]
    for fe in doc.get("frontends", []):
        frontend = f"{fe['address']}:{fe['port']}/{fe['protocol']}"
        backends = ", ".join(f"{b['slot']}) {b['address']}:{b['port']}" for b in fe["backends"])
        if not fe["backends"]:
            backends = "(none: dropped, no local backend)" if "no-local-backends" in fe["flags"] else \
                "(none: refused)"
        extra = f"  [affinity {fe['affinity_timeout']}s]" if "affinity" in fe["flags"] else ""
        extra += "  [DSR from outside]" if "dsr" in fe["flags"] else ""
        lines.append(f"  {fe['id']:>4}  {frontend:<24} {fe['service'] + ' ' + fe['kind']:<28} {backends}{extra}")
        if "external_backends" in fe:
            ext = ", ".join(f"{b['slot']}) {b['address']}:{b['port']}" for b in fe["external_backends"]) or (
                "(none: dropped, no local backend)" if "no-local-backends" in fe.get("external_flags", [])
                else "(none: dropped)")
            lines.append(f"  {'':>4}  {'':<24} {'  from outside (Local):':<28} {ext}")
        if "source-ranges" in fe["flags"]:
            ranges = ", ".join(fe.get("source_ranges", [])) or "none in IPv4: every outside client dropped"
            lines.append(f"  {'':>4}  {'':<24} {'  outside clients only from:':<28} {ranges}")
    for hc in doc.get("health_checks", []):
        answer = f"answers {hc['status']}" if hc["serving"] else f"not served: {hc['error']}"
        lines.append(f"  health-check :{hc['port']}  {hc['service']}  local endpoints {hc['local_endpoints']}, "
                     f"{answer}")
    ns = doc.get("north_south")
    if ns and ns.get("error"):
        lines.append(f"  north-south: {ns['error']}")
    elif ns:
        devices = ", ".join(f"{d['name']} (SNAT {d['snat_address']})" for d in ns["devices"]) or "none found"
        counted = ", ".join(f"{k} {v}" for k, v in ns["counters"].items() if v)
        lines.append(f"  north-south on {devices}; packets: {counted or 'none yet'}")
    for p in doc.get("problems", []):
        lines.append(f"  error: {p['service']}: {p['reason']}: {p['message']}")
    if doc.get("error"):
        lines.append(f"  error: {doc['error']}")
    return lines


def _list(args: argparse.Namespace) -> int:
    try:
        access = agent_access.AgentAccess.from_args(args, timeout_s=datapath_client.TIMEOUT_S)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    results = asyncio.run(_read(targets.etcd_target(args), args.node, access))
    if args.output == "json":
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        for node, doc in results.items():
            print("\n".join(render_text(node, doc)))
    unreadable = [n for n, d in results.items() if isinstance(d, str)]
    if unreadable:
        print(f"ciliary: could not read the load balancer of {', '.join(unreadable)}", file=sys.stderr)
        return EXIT_UNREADABLE
    return 0
