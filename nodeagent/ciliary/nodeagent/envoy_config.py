"""The node's Envoy configuration, computed from the node intent (pure: no I/O).

Owns :func:`documents` (the LDS file: the ingress and egress transparent listeners, each holding a
filter chain per redirected (local endpoint, port, peer set) whose HTTP connection manager names its
route configuration, and those route configurations, one RDS file each: ``envoy_rds``), :func:`bootstrap` (Envoy's start-up
configuration: admin socket, the original-destination cluster, LDS from a file) and
:func:`policed_ports` (which (endpoint, port) pairs the proxy polices, for status).

How a redirected connection is judged (the kernel redirects a connection to the proxy when
the allow entry deciding it carries HTTP rules, ``datapath_c/lib/l7redirect.h``):

- Envoy cannot read Ciliary's maps, so a peer's identity is expressed as the ipcache
  prefixes of that identity: one filter chain per (endpoint address, destination port,
  identity) with ``source_prefix_ranges`` = the identity's prefixes. Envoy picks the chain
  with the longest matching source prefix, which is the ipcache's longest-prefix rule; the
  chain of the "any peer" entries holds ``0.0.0.0/0`` (an ipcache miss is world) and every
  prefix nested inside another chain's prefix whose identity has no chain of its own. World
  has no prefix: when entries allow it (e.g. a client through a NodePort), ``0.0.0.0/0`` is
  the world chain's and the "any peer" chain lists the prefixes of every unchained identity.
  The document is rewritten whenever the intent (ipcache included) changes.
- A chain's routes (its route configuration, named after the chain, delivered by RDS so that a change of
  rules leaves the chain and its connections in place) are the HTTP rules of every allow entry covering (peer, TCP, port):
  the peer's own entries and the any-peer ones (several rules are OR'ed; each route is
  named after its policy rule, as JSON, so the access log names the deciding rule). If one
  covering entry has no HTTP rules (an L4 allow), every request is allowed (L4 wins, as
  in Cilium). The last route answers ``403`` with the body ``Access denied``.
- Rule semantics (the routes themselves: ``envoy_routes``): ``method``/``path``/``host`` are
  RE2 regular expressions matched against the whole ``:method``/``:path``/``:authority``
  (``:path`` includes the query string); ``headers`` entries ``"Name"`` require presence,
  ``"Name: value"`` the exact value; ``headerMatches`` with their mismatch actions. Paths
  are normalised (RFC 3986, merged slashes) before matching and forwarded normalised.
- The proxy's upstream connection to the pod is opened from the node (source: the node's
  address towards the pod) with socket mark :data:`FROM_PROXY_MARK`, which the pod's tc
  program recognises (never redirected again); the pod therefore sees the node's address,
  not the client's.

Ingress TLS termination (``terminatingTLS``, optional ``originatingTLS``): a chain whose rules carry
TLS contexts matches TLS connections only and terminates them; its allowed requests go to the pod
over TLS (a CDS cluster of ``envoy_tls``) or, without ``originatingTLS``, as plain HTTP through
:data:`CLUSTER_NAME`. Mixed TLS handling on one chain denies (``ingress_conflicts``); an L4 allow
passes the TLS through untouched; with ``serverNames`` the port's other chains get copies matching
those names (Envoy matches server names before the source).

Egress (a second transparent listener, :data:`EGRESS_LISTENER_NAME`, on the port after the
ingress one; ``cy_from_pod`` assigns the pod's connection to it, ``datapath_c/lib/redirect.h``):

- the client is the local pod, known from the connection's source address: one filter chain
  per (pod address, destination port, destination identity) with ``source_prefix_ranges``
  the pod's /32 and ``prefix_ranges`` the destination identity's ipcache prefixes (world: also
  ``0.0.0.0/0``, an ipcache miss). Envoy matches the destination prefix before the source, so
  every pod redirected on a port gets a chain for every destination group of that port (its
  own rules, possibly none: 403), otherwise one pod's more specific prefix would hide
  another's chain;
- a chain's routes are the HTTP rules of the pod's egress allow entries covering (destination
  identity, TCP, port), OR'ed with its any-peer entries; an L4 allow among them allows all;
- the upstream connection leaves from the pod's own address (``original_src``, with socket
  mark :data:`FROM_EGRESS_PROXY_MARK`), so the destination's ingress policy judges the pod's
  identity, on any node; the node plumbing (``proxy_plumbing``) routes the answers to Envoy's
  socket. This mark is not :data:`FROM_PROXY_MARK`: nothing skips the destination's policy;
- HTTP rules inside TLS (``terminatingTLS`` + ``originatingTLS``): the chain terminates the pod's
  TLS and the allowed requests go to a TLS cluster of the CDS file (:func:`cluster_document`);
  chains, clusters and PEM files are ``envoy_tls``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ciliary.nodeagent import envoy_bootstrap, envoy_rds, envoy_routes, envoy_tls
from ciliary.operator import intents

_VERSION_KEY = os.urandom(32)
"""Keys the configuration version (:func:`listener_document`); one per agent process."""

LISTENER_NAME = "cy_ingress_http"
CLUSTER_NAME = envoy_routes.CLUSTER_NAME
EGRESS_CLUSTER_NAME = envoy_routes.EGRESS_CLUSTER_NAME
DENY_ROUTE = envoy_routes.DENY_ROUTE
DENY_BODY = envoy_routes.DENY_BODY
ORIGINAL_DST_HEADER = envoy_routes.ORIGINAL_DST_HEADER
routes = envoy_routes.routes
route_name = envoy_routes.route_name
rule_of_route = envoy_routes.rule_of_route
DEFAULT_PORT = 15001
TO_PROXY_MARK = 0x0C00
"""skb mark of a packet the tc program hands to the proxy (policy routing delivers it locally)."""
FROM_PROXY_MARK = envoy_bootstrap.FROM_PROXY_MARK
bootstrap = envoy_bootstrap.bootstrap
FROM_EGRESS_PROXY_MARK = 0x0E00
"""Socket mark of the egress listener's upstream connections (sent from the client pod's address; the
node plumbing routes their answers back to Envoy; the tc programs judge them like any packet)."""
EGRESS_LISTENER_NAME = "cy_egress_http"
WORLD_IDENTITY = 2
"""The world identity (consts.h CY_ID_WORLD): what the datapath gives an address no ipcache prefix holds."""
MARK_MASK = 0x0F00
MAX_RANGE_PORTS = 256
"""An HTTP rule on a port range covers at most this many ports (one filter chain per port)."""
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME(%s.%6f)%", "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%",
    "host": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%", "route": "%ROUTE_NAME%",
    "src": "%DOWNSTREAM_REMOTE_ADDRESS%", "dst": "%DOWNSTREAM_LOCAL_ADDRESS%", "protocol": "%PROTOCOL%",
    "duration_ms": "%DURATION%", "flags": "%RESPONSE_FLAGS%", "mismatch": "%METADATA(ROUTE:ciliary:mismatch)%",
}


class ProxyConfigError(ValueError):
    """The intent asks for something the proxy configuration cannot express."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(f"endpoint {endpoint}: {message}")
        self.endpoint = endpoint


@dataclass(frozen=True, slots=True)
class Chain:
    """One filter chain: connections to ``endpoint``:``port`` from ``sources``, judged by ``rules``."""

    endpoint: str
    port: int
    sources: tuple[str, ...]
    rules: tuple[intents.HttpRule, ...] | None
    """None: every request allowed (an L4 allow covers the peer)."""
    name: str
    tls: intents.TlsInterception | None = None
    """The client's TLS is terminated here (``terminatingTLS``; ``envoy_tls``)."""
    passthrough: bool = False
    """An L4 allow wins on a port whose rules terminate TLS: the connection passes to the pod untouched."""
    server_names: tuple[str, ...] = ()
    """A copy of a chain without server names, matching the names other chains of its port match."""
    conflict: bool = False
    """Its rules mix TLS contexts (or TLS and plain HTTP): it denies every request."""


def policed_ports(intent: intents.NodeIntent, direction: intents.Direction = intents.Direction.INGRESS
                  ) -> dict[str, set[int]]:
    """Local endpoint address -> the TCP ports whose connections (in ``direction``) some entry redirects
    to the proxy."""
    out: dict[str, set[int]] = {}
    for endpoint in intent.endpoints:
        for entry in endpoint.direction(direction).entries:
            if entry.http is None or entry.verdict is not intents.Verdict.ALLOW:
                continue
            high = entry.port_high or entry.port_low
            if entry.port_low == 0 or high - entry.port_low + 1 > MAX_RANGE_PORTS:
                raise ProxyConfigError(endpoint.ipv4, f"HTTP rules on ports {entry.port_low}-{high}: the proxy "
                                                      f"takes single ports or ranges of at most {MAX_RANGE_PORTS}")
            out.setdefault(endpoint.ipv4, set()).update(range(entry.port_low, high + 1))
    return out


def policies_needing_proxy(intent: intents.NodeIntent) -> set[str]:
    """UIDs of the policies whose HTTP rules this node's proxy enforces."""
    return {rule.uid for e in intent.endpoints for entry in (*e.ingress.entries, *e.egress.entries)
            if entry.http is not None and entry.verdict is intents.Verdict.ALLOW and not entry.visibility
            for rule in entry.rules}


def _covering(entries: Iterable[intents.PolicyEntry], identity: int, port: int) -> list[intents.PolicyEntry]:
    return [e for e in entries if e.verdict is intents.Verdict.ALLOW and e.identity == identity
            and e.covers(identity, int(intents.Protocol.TCP), port)]


def _rules_for(own: list[intents.PolicyEntry], anyone: list[intents.PolicyEntry]) -> tuple[intents.HttpRule, ...] | None:
    """The HTTP rules a chain allows (None: every request, a plain L3/L4 entry covers it).

    An L7 entry without rules Envoy reads (HTTP inside TLS, a header condition from a Secret, Kafka)
    allows nothing here: the kernel drops its own traffic (``PROXY_UNAVAILABLE``), so it must not
    open the chain for the peers another entry sends to the proxy.
    """
    covering = [e for e in own + anyone if not (e.l7_redirect and e.l7_parser is not None and e.http is None)]
    if any(e.http is None for e in covering):
        return None
    return tuple(dict.fromkeys(rule for e in covering for rule in e.http or ()))


def chains(intent: intents.NodeIntent) -> list[Chain]:
    """Every filter chain of the listener, in a stable order (see the module docstring; :func:`_port_chains`)."""
    prefixes: dict[int, list[ipaddress.IPv4Network]] = {}
    for item in intent.ipcache:
        prefixes.setdefault(item.identity, []).append(ipaddress.IPv4Network(item.cidr))
    out: list[Chain] = []
    for endpoint, ports in sorted(policed_ports(intent).items(), key=lambda kv: ipaddress.IPv4Address(kv[0])):
        entries = next(e for e in intent.endpoints if e.ipv4 == endpoint).ingress.entries
        for port in sorted(ports):
            out.extend(_port_chains(endpoint, port, entries, prefixes))
    return out


def _port_chains(endpoint: str, port: int, entries: tuple[intents.PolicyEntry, ...],
                 prefixes: Mapping[int, list[ipaddress.IPv4Network]]) -> list[Chain]:
    """The chains of one (endpoint, port): each source address reaches the chain of the identity the
    datapath gives it (ipcache longest prefix, world when none matches).

    A peer identity with prefixes gets a chain of them. World, the identity of every address no
    ipcache prefix holds, has none: when entries allow it, its chain holds ``0.0.0.0/0`` and the
    any-peer chain then lists every prefix of the identities without a chain of their own (so
    those addresses never pass as world); otherwise the any-peer chain holds ``0.0.0.0/0`` plus
    the prefixes nested inside a chained prefix. A chain never has an empty prefix list (Envoy
    would match every source with it).
    """
    anyone = _covering(entries, intents.ANY_IDENTITY, port)
    peers = sorted({e.identity for e in entries if e.identity != intents.ANY_IDENTITY
                    and _covering(entries, e.identity, port)})
    own_nets = {peer: list(prefixes.get(peer, [])) for peer in peers}
    everything = ipaddress.IPv4Network("0.0.0.0/0")
    world_chained = WORLD_IDENTITY in own_nets and not any(net == everything for nets in prefixes.values() for net in nets)
    if world_chained:
        own_nets[WORLD_IDENTITY].append(everything)
    taken = [net for nets in own_nets.values() for net in nets]
    out = [_tls_of(Chain(endpoint, port, tuple(str(n) for n in sorted(own_nets[peer])),
                         _rules_for(_covering(entries, peer, port), anyone), f"{endpoint}:{port}/id{peer}"),
                   _covering(entries, peer, port) + anyone)
           for peer in peers if own_nets[peer]]
    others = {net for identity, nets in prefixes.items() if identity not in own_nets for net in nets}
    if world_chained:
        sources = tuple(str(n) for n in sorted(others))
    else:
        nested = sorted(net for net in others if any(net != outer and net.subnet_of(outer) for outer in taken))
        sources = ("0.0.0.0/0", *(str(n) for n in nested))
    default: tuple[intents.HttpRule, ...] | None = _rules_for([], anyone) if anyone else ()
    if sources:
        out.append(_tls_of(Chain(endpoint, port, sources, default, f"{endpoint}:{port}/any"), anyone))
    return _ingress_server_names(out)


def _tls_of(chain: Chain, covering: list[intents.PolicyEntry]) -> Chain:
    """``chain`` with the TLS termination its covering entries ask for (mixed: it denies everything)."""
    rules, tls, passthrough, conflict = _egress_tls(chain.rules, covering)
    if tls is None and not passthrough and not conflict:
        return chain
    return dataclasses.replace(chain, rules=rules, tls=tls, passthrough=passthrough, conflict=conflict)


def _ingress_server_names(chains: list[Chain]) -> list[Chain]:
    """Every chain of one (endpoint, port) plus, when some chain matches server names, a copy of each chain
    without names matching all of them, and for each chain with names a copy without them that denies.

    Envoy matches server names before the source address: a connection whose SNI (or plain text: none) a
    peer's named chain does not match would otherwise fall to the longest source prefix among the chains
    without names (another peer's CIDR or world chain), and be judged by that peer's rules. So every chain
    exists on both sides of the server-name split, and a peer's connection always meets its own sources'
    chain: its rules, or a deny.
    """
    wanted = sorted({n for c in chains if c.tls is not None for n in c.tls.server_names})
    if not wanted:
        return chains
    named = [c for c in chains if c.tls is not None and c.tls.server_names]
    return chains + [dataclasses.replace(c, server_names=tuple(wanted), name=f"{c.name}/sni") for c in chains
                     if c not in named] + [
        dataclasses.replace(c, rules=(), tls=None, passthrough=False, conflict=False, name=f"{c.name}/other-sni")
        for c in named]


def ingress_conflicts(intent: intents.NodeIntent) -> list[str]:
    """The ingress chains that deny every request because their rules mix TLS contexts, or TLS and plain HTTP."""
    return [c.name for c in chains(intent) if c.conflict]


def route_limit_chains(intent: intents.NodeIntent) -> list[str]:
    """The chains (ingress and egress) that deny every request because their rules' headerMatches actions need
    more routes than Envoy is given (``envoy_routes.route_limit_problem``): their policies are then not
    enforced as written on this node (the agent reports it, ``envoy_proxy``); the node's other chains are."""
    intent = envoy_routes.with_secret_values(intent)
    found: list[Chain | EgressChain] = [*chains(intent), *egress_chains(intent)]
    return [c.name for c in found if envoy_routes.route_limit_problem(c.rules)]


def _prefixes(cidrs: Iterable[str]) -> list[dict[str, Any]]:
    nets = [ipaddress.IPv4Network(cidr) for cidr in cidrs]
    return [{"address_prefix": str(net.network_address), "prefix_len": net.prefixlen} for net in nets]


@dataclass(frozen=True, slots=True)
class _Routes:
    """Where a listener's HTTP connection managers find their routes: ``configs`` collects each chain's route
    configuration (name -> configuration) and the managers reference them by RDS from ``rds_dir``; ``configs``
    None: inline routes (one self-contained listener)."""

    rds_dir: str = ""
    configs: dict[str, dict[str, Any]] | None = None


def _http_filter(name: str, rules: tuple[intents.HttpRule, ...] | None, access_log: str, where: _Routes, *,
                 egress: bool = False, cluster: str = "", validate_clusters: bool | None = None) -> dict[str, Any]:
    cluster = cluster or (EGRESS_CLUSTER_NAME if egress else CLUSTER_NAME)
    try:
        chain_routes = routes(rules, cluster)
    except envoy_routes.RouteLimitError:  # fail closed on this chain alone: it denies (route_limit_chains)
        chain_routes = routes((), cluster)
    config = envoy_rds.route_configuration(name, chain_routes, validate_clusters=validate_clusters)
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "cy_egress" if egress else "cy_ingress",
        "codec_type": "AUTO",
        "normalize_path": True,
        "merge_slashes": True,
    }
    if where.configs is None:
        hcm["route_config"] = {k: v for k, v in config.items() if k != "@type"}
    else:
        where.configs[name] = config
        hcm["rds"] = envoy_rds.rds_reference(name, where.rds_dir)
    hcm.update({
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": access_log, "log_format": {"json_format": {
                **ACCESS_LOG_FORMAT, "direction": "egress" if egress else "ingress"}}}}],
    })
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def _filter_chain(chain: Chain, access_log: str, intent: intents.NodeIntent, secrets_dir: str,
                  where: _Routes) -> dict[str, Any]:
    match: dict[str, Any] = {"destination_port": chain.port,
                             "prefix_ranges": [{"address_prefix": chain.endpoint, "prefix_len": 32}],
                             "source_prefix_ranges": _prefixes(chain.sources)}
    if chain.server_names:
        match["server_names"] = list(chain.server_names)
    out: dict[str, Any] = {"name": chain.name, "filter_chain_match": match}
    if chain.passthrough:
        out["filters"] = [envoy_tls.passthrough_filter("cy_ingress_passthrough", CLUSTER_NAME)]
        return out
    tls = envoy_tls.tls_chain(intent, chain.tls, secrets_dir, ingress=True) if chain.tls is not None else None
    if tls is None:
        rules = chain.rules if chain.tls is None else ()  # TLS material missing: deny (fail closed)
        out["filters"] = [_http_filter(chain.name, rules, access_log, where)]
        return out
    match.update(tls.match)
    out["transport_socket"] = tls.transport_socket
    http = _http_filter(chain.name, chain.rules, access_log, where, cluster=tls.cluster or CLUSTER_NAME,
                        validate_clusters=False)  # the TLS cluster is the CDS file's
    out["filters"] = [envoy_tls.sni_filter(), http] if tls.cluster else [http]
    return out


def _tls_inspector(needed: bool) -> list[dict[str, Any]]:
    return [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}] \
        if needed else []


def listener(intent: intents.NodeIntent, *, port: int, access_log: str, secrets_dir: str = "",
             rds_dir: str = "", route_configs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The transparent listener (None: nothing on this node is redirected); with ``route_configs`` its chains
    reference their routes by RDS (files under ``rds_dir``) and the route configurations are added to it,
    else they hold them inline."""
    where = _Routes(rds_dir, route_configs)
    found = chains(intent)
    if not found:
        return None
    out = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "transparent": True,
        "filter_chains": [_filter_chain(chain, access_log, intent, secrets_dir, where) for chain in found],
    }
    inspector = _tls_inspector(any(c.tls is not None or c.server_names for c in found))
    if inspector:
        out["listener_filters"] = inspector
    return out


@dataclass(frozen=True, slots=True)
class EgressChain:
    """One egress filter chain: connections from local pod ``source`` to ``destinations``:``port``."""

    source: str
    port: int
    destinations: tuple[str, ...]
    rules: tuple[intents.HttpRule, ...] | None
    """None: every request allowed (an L4 allow covers the destination)."""
    name: str
    tls: intents.TlsInterception | None = None
    """The rules apply inside TLS (``envoy_tls``)."""
    passthrough: bool = False
    """An L4 allow wins on a port whose rules intercept TLS: the connection passes untouched."""
    server_names: tuple[str, ...] = ()
    """A copy of a chain without server names, matching the names other chains of its group match
    (Envoy matches server names before the source address)."""
    conflict: bool = False
    """Its rules mix TLS contexts (or TLS and plain HTTP): it denies every request (:func:`egress_conflicts`)."""


def _egress_tls(rules: tuple[intents.HttpRule, ...] | None, covering: list[intents.PolicyEntry]
                ) -> tuple[tuple[intents.HttpRule, ...] | None, intents.TlsInterception | None, bool, bool]:
    """(rules, TLS interception, pass-through, conflict) of one egress chain; mixed TLS handling denies
    (fail closed)."""
    found = envoy_tls.chain_tls(rules, covering)
    if rules is None:
        return None, None, found is not None, False
    if isinstance(found, envoy_tls.Conflict):
        return (), None, False, True
    return rules, found, False, False


def egress_conflicts(intent: intents.NodeIntent) -> list[str]:
    """The egress chains that deny every request because their rules mix TLS contexts, or TLS and plain HTTP
    (e.g. an any-peer port rule with TLS and a peer's without): the policies are then not enforced as
    written on this node (the agent reports it, ``envoy_proxy``)."""
    return [c.name for c in egress_chains(intent) if c.conflict]


def _with_server_names(chains: list[EgressChain]) -> list[EgressChain]:
    """Every chain plus, per (port, destinations) where some chain matches server names, a copy of each
    chain without names matching all of them (else a pod asking for such a name would only find other
    pods' chains)."""
    names: dict[tuple[int, tuple[str, ...]], set[str]] = {}
    for chain in chains:
        if chain.tls is not None and chain.tls.server_names:
            names.setdefault((chain.port, chain.destinations), set()).update(chain.tls.server_names)
    out = list(chains)
    for chain in chains:
        wanted = names.get((chain.port, chain.destinations))
        if wanted and not (chain.tls is not None and chain.tls.server_names):
            out.append(dataclasses.replace(chain, server_names=tuple(sorted(wanted)),
                                           name=f"{chain.name}/sni"))
    return out


def egress_chains(intent: intents.NodeIntent) -> list[EgressChain]:
    """Every filter chain of the egress listener, in a stable order."""
    prefixes: dict[int, list[ipaddress.IPv4Network]] = {}
    for item in intent.ipcache:
        prefixes.setdefault(item.identity, []).append(ipaddress.IPv4Network(item.cidr))
    by_port: dict[int, list[str]] = {}
    for source, ports in policed_ports(intent, intents.Direction.EGRESS).items():
        for port in ports:
            by_port.setdefault(port, []).append(source)
    entries_of = {e.ipv4: e.egress.entries for e in intent.endpoints}
    out: list[EgressChain] = []
    for port, sources in sorted(by_port.items()):
        sources.sort(key=ipaddress.IPv4Address)
        peers = sorted({e.identity for s in sources for e in entries_of[s] if e.identity != intents.ANY_IDENTITY
                        and _covering(entries_of[s], e.identity, port)})
        groups: list[tuple[str, int | None, list[ipaddress.IPv4Network]]] = []
        for peer in peers:
            nets = sorted(set(prefixes.get(peer, [])) | ({ipaddress.IPv4Network("0.0.0.0/0")}
                                                          if peer == WORLD_IDENTITY else set()))
            if nets:
                groups.append((f"id{peer}", peer, nets))
        taken = [net for _, _, nets in groups for net in nets]
        own = {peer for _, peer, _ in groups}
        nested = sorted({net for identity, nets in prefixes.items() if identity not in own for net in nets
                         if any(net != outer and net.subnet_of(outer) for outer in taken)})
        if WORLD_IDENTITY not in own:
            groups.append(("any", None, [ipaddress.IPv4Network("0.0.0.0/0"), *nested]))
        elif nested:
            groups.append(("other", None, nested))
        for source in sources:
            anyone = _covering(entries_of[source], intents.ANY_IDENTITY, port)
            for label, dest, nets in groups:
                covering = _covering(entries_of[source], dest, port) if dest is not None else []
                rules = (_rules_for(covering, anyone) if dest is not None
                         else _rules_for([], anyone) if anyone else ())
                rules, tls, passthrough, conflict = _egress_tls(rules, covering + anyone)
                out.append(EgressChain(source, port, tuple(str(n) for n in nets), rules,
                                       f"egress {source}:{port}/{label}", tls, passthrough, conflict=conflict))
    return _with_server_names(out)


def _egress_filter_chain(chain: EgressChain, access_log: str, intent: intents.NodeIntent,
                         secrets_dir: str, where: _Routes) -> dict[str, Any]:
    match: dict[str, Any] = {"destination_port": chain.port, "prefix_ranges": _prefixes(chain.destinations),
                             "source_prefix_ranges": _prefixes((f"{chain.source}/32",))}
    if chain.server_names:
        match["server_names"] = list(chain.server_names)
    out: dict[str, Any] = {"name": chain.name, "filter_chain_match": match}
    if chain.passthrough:
        out["filters"] = [envoy_tls.passthrough_filter("cy_egress_passthrough", EGRESS_CLUSTER_NAME)]
        return out
    tls = envoy_tls.tls_chain(intent, chain.tls, secrets_dir) if chain.tls is not None else None
    if tls is None:
        rules = chain.rules if chain.tls is None else ()  # TLS material missing: deny (fail closed)
        out["filters"] = [_http_filter(chain.name, rules, access_log, where, egress=True)]
        return out
    match.update(tls.match)
    out["transport_socket"] = tls.transport_socket
    # the cluster comes from the CDS file (written first); should Envoy read these routes before it, a
    # request finds no cluster (503) instead of the whole update being rejected
    http = _http_filter(chain.name, chain.rules, access_log, where, egress=True, cluster=tls.cluster or "",
                        validate_clusters=False)
    out["filters"] = [envoy_tls.sni_filter(), http]
    return out


def egress_listener(intent: intents.NodeIntent, *, port: int, access_log: str, secrets_dir: str = "",
                    rds_dir: str = "", route_configs: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, Any] | None:
    """The transparent egress listener (None: no pod's egress is redirected on this node); TLS files are
    named under ``secrets_dir``; routes as for :func:`listener`."""
    where = _Routes(rds_dir, route_configs)
    found = egress_chains(intent)
    if not found:
        return None
    inspector = _tls_inspector(any(c.tls is not None or c.server_names for c in found))
    return {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": EGRESS_LISTENER_NAME,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "transparent": True,
        "listener_filters": [{"name": "envoy.filters.listener.original_src", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_src.v3.OriginalSrc",
            "mark": FROM_EGRESS_PROXY_MARK}}, *inspector],
        "filter_chains": [_egress_filter_chain(chain, access_log, intent, secrets_dir, where) for chain in found],
    }


@dataclass(frozen=True, slots=True)
class Documents:
    """Everything the agent writes for Envoy from one intent (``envoy_proxy``)."""

    version: str
    """The configuration's version (revision and a keyed digest of all of it): logged, shown in status."""
    listeners: dict[str, Any]
    """The LDS DiscoveryResponse; its version (shared by the CDS file) covers listeners and TLS clusters only,
    so it stays byte-identical when only routes change."""
    routes: dict[str, dict[str, Any]]
    """Route configuration name -> its RDS DiscoveryResponse (one file each, ``envoy_rds``), versioned alone."""


def _digest(value: Any) -> str:
    # keyed per process: versions are logged and shown, and routes hold header values from Secrets, so a
    # plain digest of them could be used to guess a short value
    return hmac.new(_VERSION_KEY, json.dumps(value, sort_keys=True).encode(), hashlib.sha256).hexdigest()[:16]


def documents(intent: intents.NodeIntent, *, port: int, access_log: str, egress_port: int = 0,
              secrets_dir: str = "", rds_dir: str = "") -> Documents:
    """The LDS document and the route configurations of ``intent`` (``egress_port`` 0: no egress listener);
    chains reference their routes by RDS from files under ``rds_dir`` (default: ``rds`` beside the access log).

    Header values from Secrets are written into the routes (the files are the agent's alone: ``envoy_proxy``)."""
    intent = envoy_routes.with_secret_values(intent)
    rds_dir = rds_dir or os.path.join(os.path.dirname(access_log), envoy_rds.RDS_DIR)
    configs: dict[str, dict[str, Any]] | None = {}
    resource = listener(intent, port=port, access_log=access_log, secrets_dir=secrets_dir, rds_dir=rds_dir,
                        route_configs=configs)
    egress = egress_listener(intent, port=egress_port, access_log=access_log, secrets_dir=secrets_dir,
                             rds_dir=rds_dir, route_configs=configs) if egress_port else None
    if configs is not None and len(configs) > envoy_rds.MAX_ROUTE_FILES:
        # more chains than the node's Envoy gets route files (inotify instances): routes inline, as before RDS
        configs = None
        resource = listener(intent, port=port, access_log=access_log, secrets_dir=secrets_dir)
        egress = egress_listener(intent, port=egress_port, access_log=access_log,
                                 secrets_dir=secrets_dir) if egress_port else None
    configs = configs or {}
    resources = [r for r in (resource, egress) if r is not None]
    clusters = envoy_tls.clusters(intent, secrets_dir, egress=bool(egress_port))
    lds_version = _digest([resources, clusters])
    routes = {name: envoy_rds.route_document(config, _digest(config)) for name, config in sorted(configs.items())}
    version = f"{intent.revision}-{_digest([lds_version, {n: d['version_info'] for n, d in routes.items()}])}"
    return Documents(version, {"version_info": lds_version, "resources": resources}, routes)


def listener_document(intent: intents.NodeIntent, *, port: int, access_log: str,
                      egress_port: int = 0, secrets_dir: str = "") -> tuple[str, dict[str, Any]]:
    """(the configuration's version, the LDS document) of :func:`documents`."""
    docs = documents(intent, port=port, access_log=access_log, egress_port=egress_port, secrets_dir=secrets_dir)
    return docs.version, docs.listeners


def cluster_document(intent: intents.NodeIntent, version: str, *, secrets_dir: str,
                     egress: bool = True) -> dict[str, Any]:
    """The CDS DiscoveryResponse: the TLS clusters of egress interception (``egress``: the node has an egress
    listener; as given to :func:`documents`, whose LDS version, given here, covers them) and ingress
    re-origination (``envoy_tls``)."""
    return {"version_info": version, "resources": envoy_tls.clusters(intent, secrets_dir, egress=egress)}


def peers_by_chain(intent: intents.NodeIntent) -> Mapping[str, tuple[str, ...]]:
    """Chain name -> its peer prefixes (ingress: sources; egress: destinations) (diagnostics)."""
    return {**{chain.name: chain.sources for chain in chains(intent)},
            **{chain.name: chain.destinations for chain in egress_chains(intent)}}
