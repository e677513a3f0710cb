"""Policy models to normalised rules: what resolution actually reads.

Owns :class:`CompiledRule` (one ``spec``/``specs[]`` rule with its subject
selector scoped to the policy's namespace), :class:`PeerRule` (one item of
``ingress``, ``ingressDeny``, ``egress`` or ``egressDeny``), :class:`PortMatch`
and :class:`CidrMatch`, and :func:`compile_policy`, called by ``repository``
for every valid policy. Decisions taken here (documented for users):

- an item with no L3 peer field but with ``toPorts``/``icmps`` matches any peer
  (identity 0); an item with neither L3 nor L4 fields matches nothing;
- ``toServices`` is not enforced yet: an item with only those peers allows
  nothing (its rule still switches the endpoint to default-deny);
- ``toFQDNs`` items keep their selectors (lower-cased, without a final dot):
  each becomes a selector identity (``identities.assign_fqdn_identities``)
  whose addresses the agent learns from DNS answers;
- ``nodeSelector`` rules (host firewall) select no endpoint and are skipped;
- IPv6 prefixes and IPv6 ICMP types are skipped (the datapath is IPv4-only); an
  item whose written peers or ICMP types are all skipped this way matches nothing
  (it never falls back to "any peer" or "every port");
- what is not enforced exactly as written is listed, once, in ``policy.support``
  (the feature table) and reported on the policy's status;
- a port rule without ports covers every port of TCP, UDP and SCTP; ``port`` unset or
  ``"0"`` covers every port of its protocol; ``ANY`` is expanded later into
  TCP, UDP and SCTP;
- ``rules.http`` of an allow item, ingress or egress (without TLS or server names), is
  carried as :class:`HttpMatch` items for the node's HTTP proxy; on egress also with both
  ``terminatingTLS`` and ``originatingTLS``, on ingress with ``terminatingTLS`` (and optional
  ``originatingTLS``), either with optional ``serverNames``: the items then carry the TLS contexts (a Secret's namespace defaults to the policy's, in a CCNP to the
  selected endpoint's: left empty here); a ``headerMatches`` item with a ``secret`` keeps the
  Secret's reference (same namespace rule), read when intents are published; other L7 kinds
  only set ``l7``;
- ``RuleRef.rule_index`` is the position in ``spec`` followed by ``specs``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ciliary.operator.api.networkpolicy import NetworkPolicy
from ciliary.operator.api.policies import AnyPolicy
from ciliary.operator.api.ports import ICMPRule, PortDenyRule, PortRule, TLSContext
from ciliary.operator.api.rules import (
    CIDRRule,
    EgressDenyRule,
    EgressRule,
    IngressDenyRule,
    IngressRule,
    Rule,
)
from ciliary.operator.api.selectors import LabelSelector
from ciliary.operator.intents import (
    Direction,
    DNSRule,
    HeaderMatch,
    L7Parser,
    PolicyRef,
    Protocol,
    RuleRef,
    SecretRef,
    TlsContextRef,
    TlsInterception,
    Verdict,
)
from ciliary.operator.policy import selection
from ciliary.operator.policy.selection import Selector

ICMP_V4_TYPES = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
"""ICMPv4 type names (the IPv6-only names have no IPv4 number and are skipped)."""

_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP, "ANY": Protocol.ANY}


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One ``rules.http[]`` item, normalised (unset fields are empty: match anything)."""

    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()
    tls: TlsInterception | None = None
    """Egress HTTP inside TLS (both contexts written); its Secrets are read when intents are published."""


@dataclass(frozen=True, slots=True)
class PortMatch:
    """One port (range) of a port rule; ``name`` is set for a named port (resolved later)."""

    protocol: Protocol
    low: int = 0
    high: int = 0
    name: str | None = None
    l7: bool = False
    l7_parser: L7Parser | None = None
    dns: tuple[DNSRule, ...] = ()
    """``rules.dns`` of the port rule (l7_parser "dns")."""
    http: tuple[HttpMatch, ...] | None = None
    """HTTP rules to enforce in the node's proxy (ingress, plain HTTP only); None: no HTTP redirect."""


@dataclass(frozen=True, slots=True)
class CidrMatch:
    """An IPv4 prefix minus its excepted sub-prefixes."""

    cidr: ipaddress.IPv4Network
    excepts: tuple[ipaddress.IPv4Network, ...] = ()

    def covers(self, prefix: ipaddress.IPv4Network) -> bool:
        """Does this match select the identity of ``prefix`` (a prefix with its own ipcache entry)?"""
        if not prefix.subnet_of(self.cidr):
            return False
        return not any(prefix.subnet_of(e) for e in self.excepts)


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One item of a direction section, normalised."""

    ref: RuleRef
    direction: Direction
    verdict: Verdict
    selectors: tuple[Selector, ...] = ()
    requires: tuple[Selector, ...] = ()
    cidrs: tuple[CidrMatch, ...] = ()
    entities: tuple[str, ...] = ()
    any_peer: bool = False
    ports: tuple[PortMatch, ...] = ()
    icmp_types: tuple[int, ...] = ()
    fqdns: tuple[DNSRule, ...] = ()
    """``toFQDNs`` selectors (egress allow items)."""
    l4_written: bool = False
    """The item has ``toPorts`` or ``icmps`` (even if none of them could be kept, e.g. IPv6 ICMP types)."""

    @property
    def l3_only(self) -> bool:
        """No ``toPorts`` and no ``icmps`` written: every port and protocol of the selected peers."""
        return not self.l4_written

    def prefixes(self) -> Iterable[ipaddress.IPv4Network]:
        for match in self.cidrs:
            yield match.cidr
            yield from match.excepts


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule of one policy: its scoped subject and its items per direction."""

    policy: PolicyRef
    rule_index: int
    subject: Selector
    ingress: tuple[PeerRule, ...]
    egress: tuple[PeerRule, ...]
    has_ingress: bool
    has_egress: bool
    default_deny_ingress: bool
    default_deny_egress: bool

    def items(self, direction: Direction) -> tuple[PeerRule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def has(self, direction: Direction) -> bool:
        return self.has_ingress if direction is Direction.INGRESS else self.has_egress

    def default_deny(self, direction: Direction) -> bool:
        return self.default_deny_ingress if direction is Direction.INGRESS else self.default_deny_egress

    def selectors(self) -> Iterable[Selector]:
        yield self.subject
        for item in (*self.ingress, *self.egress):
            yield from item.selectors
            yield from item.requires


def policy_ref(policy: AnyPolicy | NetworkPolicy) -> PolicyRef:
    return PolicyRef(
        kind=policy.kind,
        namespace=policy.namespace,
        name=policy.name,
        uid=policy.metadata.uid or "",
        generation=policy.metadata.generation or 0,
    )


def compile_policy(policy: AnyPolicy) -> tuple[CompiledRule, ...]:
    """Every rule of ``policy`` in normalised form (a validated policy never fails here)."""
    ref = policy_ref(policy)
    namespace = "" if policy.is_clusterwide else policy.namespace
    compiled = []
    for index, rule in enumerate(policy.rules()):
        if rule.endpoint_selector is None:
            continue
        compiled.append(compile_rule(rule, ref, index, namespace))
    return tuple(compiled)


def compile_rule(rule: Rule, policy: PolicyRef, index: int, namespace: str) -> CompiledRule:
    subject = selection.scope_subject(selection.from_api(rule.endpoint_selector), namespace)

    def ref(section: str, item: int) -> RuleRef:
        return RuleRef(
            kind=policy.kind,
            namespace=policy.namespace,
            name=policy.name,
            uid=policy.uid,
            rule_index=index,
            section=f"{section}[{item}]",
        )

    ingress: list[PeerRule] = []
    for i, item in enumerate(rule.ingress or ()):
        ingress.append(_ingress(item, ref("ingress", i), Verdict.ALLOW, namespace))
    for i, deny in enumerate(rule.ingress_deny or ()):
        ingress.append(_ingress(deny, ref("ingressDeny", i), Verdict.DENY, namespace))
    egress: list[PeerRule] = []
    for i, out in enumerate(rule.egress or ()):
        egress.append(_egress(out, ref("egress", i), Verdict.ALLOW, namespace))
    for i, out_deny in enumerate(rule.egress_deny or ()):
        egress.append(_egress(out_deny, ref("egressDeny", i), Verdict.DENY, namespace))
    has_ingress = bool(rule.ingress) or bool(rule.ingress_deny)
    has_egress = bool(rule.egress) or bool(rule.egress_deny)
    defaults = rule.enable_default_deny
    return CompiledRule(
        policy=policy,
        rule_index=index,
        subject=subject,
        ingress=tuple(ingress),
        egress=tuple(egress),
        has_ingress=has_ingress,
        has_egress=has_egress,
        default_deny_ingress=has_ingress and (defaults is None or defaults.ingress is not False),
        default_deny_egress=has_egress and (defaults is None or defaults.egress is not False),
    )


def _ingress(
    item: IngressRule | IngressDenyRule, ref: RuleRef, verdict: Verdict, namespace: str
) -> PeerRule:
    cidrs = _cidrs(item.from_cidr, item.from_cidr_set)
    written = bool(item.from_cidr) or bool(item.from_cidr_set)
    return _peer_rule(
        ref,
        Direction.INGRESS,
        verdict,
        namespace,
        endpoints=item.from_endpoints,
        requires=item.from_requires,
        cidrs=cidrs,
        entities=item.from_entities or (),
        other_l3=written,
        port_rules=item.to_ports,
        icmps=item.icmps,
        http_proxy=verdict is Verdict.ALLOW,
        tls_proxy="ingress",
    )


def _egress(item: EgressRule | EgressDenyRule, ref: RuleRef, verdict: Verdict, namespace: str) -> PeerRule:
    cidrs = _cidrs(item.to_cidr, item.to_cidr_set)
    other_l3 = bool(item.to_services) or bool(getattr(item, "to_fqdns", None)) or \
        bool(item.to_cidr) or bool(item.to_cidr_set)
    fqdns = tuple(sorted({fqdn_selector(f.match_name, f.match_pattern) for f in getattr(item, "to_fqdns", None) or ()},
                         key=lambda r: (r.match_name or "", r.match_pattern or "")))
    return _peer_rule(
        ref,
        Direction.EGRESS,
        verdict,
        namespace,
        endpoints=item.to_endpoints,
        requires=item.to_requires,
        cidrs=cidrs,
        entities=item.to_entities or (),
        other_l3=other_l3,
        port_rules=item.to_ports,
        icmps=item.icmps,
        http_proxy=verdict is Verdict.ALLOW,
        fqdns=fqdns,
        tls_proxy="egress",
    )


def fqdn_selector(match_name: str | None, match_pattern: str | None) -> DNSRule:
    """A toFQDNs (or rules.dns) item in canonical form: lower case, no final dot."""
    def canon(text: str | None) -> str | None:
        return None if text is None else text.strip().lower().rstrip(".")

    return DNSRule(match_name=canon(match_name), match_pattern=canon(match_pattern))


def _peer_rule(
    ref: RuleRef,
    direction: Direction,
    verdict: Verdict,
    namespace: str,
    *,
    endpoints: Sequence[LabelSelector] | None,
    requires: Sequence[LabelSelector] | None,
    cidrs: tuple[CidrMatch, ...],
    entities: Sequence[str],
    other_l3: bool,
    port_rules: Sequence[PortRule | PortDenyRule] | None,
    icmps: Sequence[ICMPRule] | None,
    http_proxy: bool = False,
    fqdns: tuple[DNSRule, ...] = (),
    tls_proxy: TlsSide | None = None,
) -> PeerRule:
    selectors = tuple(selection.scope_peer(selection.from_api(s), namespace) for s in endpoints or ())
    scoped_requires = tuple(selection.scope_peer(selection.from_api(s), namespace) for s in requires or ())
    ports = tuple(p for rule in port_rules or () for p in _ports(rule, http_proxy, tls_proxy, namespace))
    icmp_types = tuple(sorted({t for rule in icmps or () for t in _icmp_types(rule)}))
    has_l3 = bool(selectors) or bool(cidrs) or bool(entities) or other_l3
    has_l4 = bool(port_rules) or bool(icmps)
    return PeerRule(
        ref=ref,
        direction=direction,
        verdict=verdict,
        selectors=selectors,
        requires=scoped_requires,
        cidrs=cidrs,
        entities=tuple(sorted(set(entities))),
        any_peer=not has_l3 and has_l4,
        ports=ports,
        icmp_types=icmp_types,
        fqdns=fqdns if verdict is Verdict.ALLOW else (),
        l4_written=has_l4,
    )


def tls_interception(rule: PortRule, namespace: str = "", *, ingress: bool = False) -> TlsInterception | None:
    """The TLS contexts of a port rule the proxy can handle (None otherwise): on egress both
    ``terminatingTLS`` and ``originatingTLS`` written; on ingress ``terminatingTLS``, with or without
    ``originatingTLS`` (without: plain HTTP to the pod, as Cilium's proxy does)."""
    if rule.terminating_tls is None or (rule.originating_tls is None and not ingress):
        return None
    return TlsInterception(terminating=_context(rule.terminating_tls, namespace),
                           originating=None if rule.originating_tls is None else _context(rule.originating_tls,
                                                                                           namespace),
                           server_names=tuple(sorted({n.lower().rstrip(".") for n in rule.server_names or ()})))


def foreign_secret_namespaces(rule: PortRule, namespace: str) -> list[str]:
    """The Secret namespaces a port rule of a namespaced policy (``namespace``) names other than its own:
    header values (``headerMatches[].secret``) and TLS material (``terminatingTLS``/``originatingTLS``).

    A CiliumNetworkPolicy may only use Secrets of its own namespace: the operator can read every Secret, and
    whoever may write policies in one namespace must not make the node's proxy use another's material (a
    header value written into the pod's requests, a client certificate presented upstream in another
    namespace's name, a server certificate shown to the pod). Cilium's guides put the TLS Secrets in
    ``kube-system`` for a policy in ``default``: such a port rule is not proxied here (its connections are
    dropped, ``support`` row ``foreign-secret``). Cluster-wide policies (empty ``namespace``) may name any
    namespace.
    """
    if not namespace:
        return []
    written = [m.secret.namespace for h in (rule.rules.http or () if rule.rules is not None else ())
               for m in h.header_matches or () if m.secret is not None]
    written += [context.secret.namespace for context in (rule.terminating_tls, rule.originating_tls)
                if context is not None]
    return sorted({ns for ns in written if ns and ns != namespace})


def _context(context: TLSContext, namespace: str) -> TlsContextRef:
    return TlsContextRef(namespace=context.secret.namespace or namespace, name=context.secret.name,
                         trusted_ca=context.trusted_ca, certificate=context.certificate,
                         private_key=context.private_key)


TlsSide = Literal["ingress", "egress"]


def http_matches(rule: PortRule, *, tls: TlsSide | None = None, namespace: str = ""
                 ) -> tuple[HttpMatch, ...] | None:
    """The HTTP rules the node's proxy enforces for a port rule of an allow item; None when it is not proxied.

    Proxied: ``rules.http`` without TLS contexts or server names, or with the contexts
    :func:`tls_interception` takes for the side ``tls`` (egress: both; ingress: ``terminatingTLS``,
    optionally ``originatingTLS``). The others (egress with one context alone, ``originatingTLS`` or
    ``serverNames`` without ``terminatingTLS``) are not proxied: the node drops their connections
    (``PROXY_UNAVAILABLE``) and ``support`` reports them. A header
    match with a ``secret`` keeps the Secret's reference (namespace: the policy's, in a CCNP left
    empty for the selected endpoint's) and its inline ``value`` (Cilium's fallback); the operator
    reads the Secret when it publishes the intents (``policy.header_secrets``).
    """
    if rule.rules is None or rule.rules.http is None:
        return None
    if foreign_secret_namespaces(rule, namespace):
        return None  # a namespaced policy names another namespace's Secret: not proxied, dropped (support)
    intercepted = tls_interception(rule, namespace, ingress=tls == "ingress") if tls else None
    written = rule.terminating_tls is not None or rule.originating_tls is not None or bool(rule.server_names)
    if written and intercepted is None:
        return None
    return tuple(HttpMatch(method=h.method or "", path=h.path or "", host=h.host or "",
                           headers=tuple(h.headers or ()),
                           header_matches=tuple(HeaderMatch(
                               name=m.name, value=m.value or "", mismatch=m.mismatch,
                               secret=None if m.secret is None else SecretRef(
                                   namespace=m.secret.namespace or namespace, name=m.secret.name))
                               for m in h.header_matches or ()),
                           tls=intercepted)
                 for h in rule.rules.http) or (HttpMatch(tls=intercepted),)


def _l7_of(rule: PortRule | PortDenyRule) -> tuple[L7Parser | None, tuple[DNSRule, ...]]:
    if not isinstance(rule, PortRule) or rule.rules is None:
        return None, ()
    kinds = rule.rules.kinds()
    if not kinds:
        return None, ()
    parser: L7Parser = kinds[0]  # type: ignore[assignment]  # validation allows one kind per port rule
    dns = tuple(fqdn_selector(d.match_name, d.match_pattern) for d in rule.rules.dns or ())
    return parser, dns


def _ports(rule: PortRule | PortDenyRule, http_proxy: bool, tls_proxy: TlsSide | None = None,
           namespace: str = "") -> Iterable[PortMatch]:
    parser, dns = _l7_of(rule)
    l7 = parser is not None
    http = http_matches(rule, tls=tls_proxy, namespace=namespace) if http_proxy and isinstance(rule, PortRule) \
        else None
    if not rule.ports:
        yield PortMatch(Protocol.ANY, l7=l7, l7_parser=parser, dns=dns, http=http)
        return
    for port in rule.ports:
        protocol = _PROTOCOLS.get(port.protocol or "ANY", Protocol.ANY)
        if port.is_named:
            yield PortMatch(protocol, name=port.port, l7=l7, l7_parser=parser, dns=dns, http=http)
            continue
        low = port.number or 0
        high = max(low, port.end_port or 0) if low else 0
        yield PortMatch(protocol, low, high, l7=l7, l7_parser=parser, dns=dns, http=http)


def _icmp_types(rule: ICMPRule) -> Iterable[int]:
    for field in rule.fields or ():
        if field.family == "IPv6":
            continue
        if isinstance(field.type, int):
            yield field.type
        elif field.type.isdigit():
            yield int(field.type)
        elif field.type in ICMP_V4_TYPES:
            yield ICMP_V4_TYPES[field.type]


def parse_prefix(value: str) -> ipaddress.IPv4Network | None:
    """An IPv4 prefix (a bare address is a /32); None for IPv6 or garbage."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    return network if isinstance(network, ipaddress.IPv4Network) else None


def _cidrs(plain: Sequence[str] | None, sets: Sequence[CIDRRule] | None) -> tuple[CidrMatch, ...]:
    out: list[CidrMatch] = []
    for value in plain or ():
        prefix = parse_prefix(value)
        if prefix is not None:
            out.append(CidrMatch(prefix))
    for cidr_rule in sets or ():
        prefix = parse_prefix(cidr_rule.cidr)
        if prefix is None:
            continue
        excepts = (parse_prefix(e) for e in cidr_rule.except_ or ())
        out.append(CidrMatch(prefix, tuple(sorted({e for e in excepts if e is not None and e.subnet_of(prefix)}))))
    return tuple(out)
