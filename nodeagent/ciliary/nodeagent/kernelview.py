"""What the node's datapath holds, read back from the pinned maps into the intent's vocabulary (pure).

``GET /v1/datapath`` (``datapath_api``) serves :func:`kernel_document`: the contents of
``cy_endpoints``, ``cy_ipcache``, ``cy_policy`` and ``cy_policy_deny`` as observed by
``engine.Datapath.observe``, decoded into a :class:`intents.NodeIntent` so that
``ciliary policy trace`` can run the very same ``evaluate_entries`` on what the
kernel enforces rather than on what the operator asked for.

Decoding (:func:`kernel_intent`):
- an endpoint's directions are enforced as its ``CY_EP_*_ENFORCED`` flags say;
- policy keys are grouped by (endpoint, direction, verdict map, identity, protocol,
  cookie); their port prefix blocks are merged back into ranges; a block of 0 bits is
  "any port", kept as an entry of its own (the lookup tells it from a port key); a single
  ICMP "port" is the ICMP type (also type 0);
- allow keys flagged ``POLICY_NO_PROXY`` (L7 rules without a proxy on this node) are
  dropped by the datapath: they are shown as deny entries and noted under
  ``unrepresentable`` (a deny entry never says more than the kernel allows);
- deny entries of a direction whose ``CY_EP_*_DENY`` flag is clear are never probed
  by the datapath: they are left out of the view and listed under ``inactive``;
- keys of no endpoint, and what the entry model cannot say (port 0 of TCP/UDP), are
  listed under ``orphaned`` / ``unrepresentable`` rather than silently dropped;
- the ipcache is the map's contents; the datapath looks local endpoints up before
  the ipcache, so each endpoint is added as a /32 of its identity (overriding);
- entry rules come from the cookie (``Datapath.rules_for``: the rules of the last
  applied intent); an unknown cookie (entries left by an earlier intent) has none.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from ciliary.nodeagent import planning
from ciliary.nodeagent.planning import MapDirection, PolicyKey, PolicyValue
from ciliary.operator import intents

#: a span of :func:`merge_blocks`: the "any port" key (0 bits), an entry of its own whatever the port keys cover
ANY_PORT = None


@dataclasses.dataclass(frozen=True)
class PodName:
    namespace: str
    pod: str
    uid: str = ""


@dataclasses.dataclass(frozen=True)
class KernelView:
    """The decoded maps, and what could not be shown as entries."""

    intent: intents.NodeIntent
    endpoints: Mapping[IPv4Address, planning.EndpointValue]
    inactive: tuple[str, ...] = ()
    orphaned: tuple[str, ...] = ()
    unrepresentable: tuple[str, ...] = ()


def merge_blocks(keys: Iterable[PolicyKey]) -> list[tuple[int, int] | None]:
    """The port ranges covered by ``keys``' prefix blocks, merged, after :data:`ANY_PORT` when one key is
    "any port" (0 bits): the datapath probes a port key before the any-port key of the same identity, so
    the two are distinct kinds of match (Hubble's l3-l4 and l3-proto) even where the any-port key already
    admits the port."""
    keys = list(keys)
    merged: list[tuple[int, int]] = []
    for low, high in sorted(k.port_range() for k in keys if k.port_bits != 0):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    any_port: list[tuple[int, int] | None] = [ANY_PORT] if any(k.port_bits == 0 for k in keys) else []
    return any_port + merged


def range_entries(identity: int, protocol: int, span: tuple[int, int] | None, verdict: intents.Verdict,
                  rules: tuple[intents.RuleRef, ...], http: bool = False) -> tuple[list[intents.PolicyEntry], str]:
    """PolicyEntries that cover exactly the ports [low, high] of ``span`` (:data:`ANY_PORT`: any port) for
    (identity, protocol); a note when they cannot.

    ``http``: the keys carry the HTTP redirect flag; the entries say so with ``http=()`` (the rules
    themselves live in the node's Envoy, not in the kernel)."""
    proto = intents.Protocol(protocol)
    l7: dict[str, Any] = {"l7_redirect": True, "http": ()} if http else {}

    def entry(**ports: Any) -> intents.PolicyEntry:
        return intents.PolicyEntry(identity=identity, protocol=proto, verdict=verdict, rules=rules, **l7, **ports)

    if span is ANY_PORT:
        return [entry()], ""
    low, high = span
    out: list[intents.PolicyEntry] = []
    note = ""
    if low == 0:
        if proto is intents.Protocol.ICMP:
            out.append(entry(icmp_type=0))
        else:
            note = f"identity {identity} protocol {protocol}: port 0 (no entry can name it)"
        low = 1
        if high < low:
            return out, note
    if proto is intents.Protocol.ICMP and low == high and high <= 255:
        out.append(entry(icmp_type=low))
    else:
        out.append(entry(port_low=low, port_high=high if high != low else 0))
    return out, note


def _direction_entries(keys: Mapping[PolicyKey, PolicyValue], verdict: intents.Verdict,
                       rules_for: Callable[[int], tuple[intents.RuleRef, ...]]
                       ) -> tuple[list[intents.PolicyEntry], list[str]]:
    groups: dict[tuple[int, int, int, bool], list[PolicyKey]] = defaultdict(list)
    for key, value in keys.items():
        groups[(key.identity, key.protocol, value.cookie, bool(value.flags & planning.POLICY_HTTP))].append(key)
    out: list[intents.PolicyEntry] = []
    notes: list[str] = []
    for (identity, protocol, cookie, http), group in sorted(groups.items()):
        if protocol not in {int(p) for p in intents.Protocol}:
            notes.append(f"identity {identity}: protocol {protocol} is not a protocol entries can name")
            continue
        for span in merge_blocks(group):
            made, note = range_entries(identity, protocol, span, verdict, rules_for(cookie), http)
            out.extend(made)
            if note:
                notes.append(note)
    return out, notes


def kernel_intent(node: str, state: planning.DatapathState, *, revision: int = 0,
                  names: Mapping[IPv4Address, PodName] | None = None,
                  rules_for: Callable[[int], tuple[intents.RuleRef, ...]] = lambda _c: (),
                  identity_labels: Mapping[int, tuple[str, ...]] | None = None) -> KernelView:
    """Decode ``state`` (the observed maps) into the NodeIntent the datapath enforces."""
    names = names or {}
    by_ep: dict[int, IPv4Address] = {v.ep_id: ip for ip, v in state.endpoints.items()}
    keys: dict[tuple[int, MapDirection, bool], dict[PolicyKey, PolicyValue]] = defaultdict(dict)
    orphaned: list[str] = []
    for deny, table in ((False, state.policy), (True, state.policy_deny)):
        for key, pvalue in table.items():
            if key.ep_id not in by_ep:
                orphaned.append(f"{'deny' if deny else 'allow'} key of endpoint id {key.ep_id} "
                                f"({key.direction.name.lower()}, identity {key.identity})")
                continue
            keys[(key.ep_id, key.direction, deny)][key] = pvalue
    endpoints: list[intents.EndpointIntent] = []
    inactive: list[str] = []
    unrepresentable: list[str] = []
    for ip, value in sorted(state.endpoints.items()):
        name = names.get(ip, PodName("", str(ip)))
        policies: dict[str, intents.DirectionPolicy] = {}
        for direction in intents.Direction:
            d = MapDirection.of(direction)
            made: list[intents.PolicyEntry] = []
            deny_keys = keys.get((value.ep_id, d, True), {})
            if deny_keys and not value.flags & planning.deny_flag(d):
                inactive.append(f"{name.namespace}/{name.pod} {direction.value}: {len(deny_keys)} deny keys "
                                "not probed (the endpoint's deny flag is clear)")
                deny_keys = {}
            allow_keys = keys.get((value.ep_id, d, False), {})
            no_proxy = {k: v for k, v in allow_keys.items() if v.flags & planning.POLICY_NO_PROXY}
            if no_proxy:
                unrepresentable.append(
                    f"{name.namespace}/{name.pod} {direction.value}: {len(no_proxy)} allow keys need a proxy "
                    "this node does not run: their packets are dropped (PROXY_UNAVAILABLE), shown as deny entries")
            for verdict, table in ((intents.Verdict.DENY, deny_keys), (intents.Verdict.DENY, no_proxy),
                                   (intents.Verdict.ALLOW, {k: v for k, v in allow_keys.items()
                                                            if k not in no_proxy})):
                entries, notes = _direction_entries(table, verdict, rules_for)
                made.extend(entries)
                unrepresentable.extend(f"{name.namespace}/{name.pod} {direction.value}: {n}" for n in notes)
            policies[direction.value] = intents.DirectionPolicy(
                enforced=bool(value.flags & planning.enforced_flag(d)), entries=tuple(made))
        endpoints.append(intents.EndpointIntent(
            namespace=name.namespace, pod=name.pod, uid=name.uid, ipv4=str(ip), identity=max(value.identity, 1),
            ingress=policies["ingress"], egress=policies["egress"]))
    ipcache: dict[str, intents.IpcacheEntry] = {}
    for net, cached in sorted(state.ipcache.items(), key=lambda kv: (kv[0].prefixlen, kv[0])):
        if cached.identity >= 1:
            ipcache[str(net)] = intents.IpcacheEntry(cidr=str(net), identity=cached.identity)
        else:
            unrepresentable.append(f"ipcache {net}: identity {cached.identity}")
    for ip, value in state.endpoints.items():  # looked up before the ipcache by the datapath
        if value.identity >= 1:
            ipcache[str(IPv4Network(f"{ip}/32"))] = intents.IpcacheEntry(cidr=f"{ip}/32", identity=value.identity)
    intent = intents.NodeIntent(node=node, revision=revision, endpoints=tuple(endpoints),
                                ipcache=tuple(ipcache.values()), identity_labels=dict(identity_labels or {}))
    return KernelView(intent, dict(state.endpoints), tuple(inactive), tuple(orphaned),
                      tuple(unrepresentable))


def kernel_document(view: KernelView, *, applied_revision: int | None, wanted_revision: int | None,
                    error: str = "") -> dict[str, Any]:
    """The ``GET /v1/datapath`` body."""
    return {
        "node": view.intent.node,
        "source": "datapath",
        "appliedRevision": applied_revision,
        "wantedRevision": wanted_revision,
        "error": error,
        "intent": view.intent.model_dump(mode="json"),
        "endpoints": [{"ipv4": str(ip), "epId": v.ep_id, "identity": v.identity, "flags": v.flags,
                       "ifindex": v.ifindex} for ip, v in sorted(view.endpoints.items())],
        "inactive": list(view.inactive),
        "orphaned": list(view.orphaned),
        "unrepresentable": list(view.unrepresentable),
    }
