"""The feature -> enforcement table, written down once, and what a policy uses that is not enforced.

Owns :data:`FEATURES` (every construct of the ``cilium.io/v2`` rule language the
CRDs know, with its :class:`Support` level and what Ciliary does with it),
:func:`gaps` (the constructs of one parsed policy that are not enforced exactly
as written, each with its field path) and :func:`render_table` (the same table
as Markdown; README.md carries it and a unit test keeps the two equal).

Levels:

- ``enforced``: enforced exactly as written (HTTP rules, ingress and egress, and HTTP rules inside
  TLS: by the node's Envoy, and a node reports the policy enforcing only while its Envoy runs with the
  configuration);
- ``partial``: accepted; the policy's L3/L4 part is enforced, this construct is
  not (the row says what happens instead). A policy using it never reads
  ``Enforced=True``: its status shows ``Enforced=False`` with reason
  ``PartiallyEnforced`` naming every such part, and the operator posts a Warning
  Event ``PolicyPartiallyEnforced``;
- ``refused``: the API server (CRD schema) or the operator (``Valid=False``,
  Event ``PolicyInvalid``) refuses the policy; it is never enforced.

Pure: reads only the API models.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ciliary.operator.api.policies import AnyPolicy
from ciliary.operator.api.ports import ICMPRule, PortDenyRule, PortRule
from ciliary.operator.api.rules import (
    CIDRRule,
    EgressDenyRule,
    EgressRule,
    IngressDenyRule,
    IngressRule,
    Rule,
)
from ciliary.operator.api.selectors import LabelSelector
from ciliary.operator.policy import identities, selection
from ciliary.operator.policy.compiling import ICMP_V4_TYPES, foreign_secret_namespaces

MAX_MESSAGE = 1024


class Support(StrEnum):
    ENFORCED = "enforced"
    PARTIAL = "partial"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Feature:
    """One row of the table."""

    key: str
    construct: str
    support: Support
    what: str
    """What Ciliary does with it (for partial rows: what is not enforced, and what happens instead)."""


_E, _P, _R = Support.ENFORCED, Support.PARTIAL, Support.REFUSED

FEATURES: tuple[Feature, ...] = (
    # --- enforced exactly as written
    Feature("endpointSelector", "`endpointSelector`", _E,
            "selects the pods the rule applies to (in a CNP only pods of its namespace)"),
    Feature("directions", "`ingress`, `egress`, `ingressDeny`, `egressDeny`", _E,
            "a pod is default-deny in a direction once any rule selects it there; deny beats allow"),
    Feature("enableDefaultDeny", "`enableDefaultDeny: true` (the default)", _E,
            "any selecting rule makes the direction default-deny; for `false` see the IPv6 row below"),
    Feature("endpoints", "`fromEndpoints`, `toEndpoints`", _E, "peers by labels (namespace is a label)"),
    Feature("requires", "`fromRequires`, `toRequires`", _E,
            "ANDed into every `fromEndpoints`/`toEndpoints` selector of the allow items selecting the same pod"),
    Feature("cidr", "`fromCIDR`, `toCIDR`, `fromCIDRSet`, `toCIDRSet` (IPv4, with `except`)", _E,
            "peers outside the cluster by IPv4 prefix, minus the excepted prefixes"),
    Feature("entities", "`fromEntities`/`toEntities`: `world-ipv4`, `cluster`, `host`, "
            "`remote-node`, `health`, `init`, `ingress`, `none`; in deny rules also `all` and `world`", _E,
            "Cilium's reserved identities (no pod of Ciliary carries health, init or ingress)"),
    Feature("ports", "`toPorts[].ports`: `port` (number or name), `endPort`, `protocol` TCP/UDP/SCTP/ANY", _E,
            "L4 ports and ranges; a named port resolves against the pod that owns it"),
    Feature("icmps", "`icmps` (IPv4 types, by number or name)", _E, "ICMP types"),
    Feature("metadata", "`specs`, `labels`, `description` (also top-level)", _E, "several rules; no effect"),
    Feature("http", "`toPorts[].rules.http` in `ingress` (`path`, `method`, `host`, `headers`)", _E,
            "connections from the selected peers to the port go through the node's Envoy; a request matching "
            "none of the rules gets 403 `Access denied`. Enforced=True on a node only while its Envoy runs "
            "with the policy's configuration"),
    Feature("http-egress", "`toPorts[].rules.http` in `egress` (`path`, `method`, `host`, `headers`)", _E,
            "the selected pods' connections to the port and the selected peers (`toEndpoints`, `toCIDR`, "
            "`toEntities`, `toFQDNs`) go through the node's Envoy, which forwards a request matching one of the "
            "rules to the original destination from the pod's own address (the destination's ingress policy "
            "still applies) and answers others 403 `Access denied`. Enforced=True on a node only while its "
            "Envoy runs with the policy's configuration; without it the connections are dropped"),
    Feature("headerMatches", "`toPorts[].rules.http[].headerMatches` with an inline `value` (`mismatch` unset, "
            "`LOG`, `ADD`, `DELETE`, `REPLACE`)", _E,
            "without `mismatch` the header must have the value (an empty value: be present) for the rule to "
            "allow the request; with an action the rule allows it either way and Envoy, when the header does "
            "not match, logs it (`LOG`, in the L7 flow), adds the value (`ADD`), removes the header (`DELETE`) "
            "or sets it (`REPLACE`) before forwarding. At most 4 headers with actions per rule (more: Valid=False); "
            "when several rules allow a request, the actions of every one of them apply, in rule order. A port "
            "rule whose rules with actions would need more than 512 proxy routes (each set of them that can allow "
            "a request together) is refused (Valid=False); when several policies' rules on one port and peer need "
            "more, that port and peer deny every request (fail closed) and the node reports its HTTP policies "
            "not enforced, naming the chain"),
    Feature("headerMatches-secret", "`toPorts[].rules.http[].headerMatches[]` with a `secret` (with or without "
            "`mismatch`)", _E,
            "as with an inline value; the value is the Secret's only item (its namespace defaults to the selected "
            "pod's), read by the operator and put only into the intents of nodes hosting selected pods, published "
            "again when the Secret changes, never in logs, flows, status or `policy get`. A Secret that is "
            "missing, has not exactly one item or whose value is no header value (e.g. a final newline): the "
            "inline `value` is matched instead when written (Cilium's fallback), otherwise the port's connections "
            "are dropped (`PROXY_UNAVAILABLE`); either way Enforced=False naming the Secret and a Warning Event "
            "`HeaderSecretProblem`"),
    Feature("http-tls-egress", "`toPorts[].rules.http` in `egress` with both `terminatingTLS` and "
            "`originatingTLS` (Secrets; optional `serverNames`)", _E,
            "TLS interception: the node's Envoy terminates the pod's TLS with the `terminatingTLS` Secret's "
            "`tls.crt`/`tls.key` (the pod must trust their CA; a `ca.crt` there requires a client certificate), "
            "applies the HTTP rules inside TLS (403 `Access denied`) and re-originates TLS to the original "
            "destination, verifying it against the `originatingTLS` Secret's `ca.crt` (required) and the name the "
            "pod asked for; with `serverNames` a pod asking for another name is disconnected. The Secrets' items "
            "go only into the intents of nodes hosting selected pods, are published again when a Secret "
            "changes, and never appear in logs, flows, status or `policy get`. A missing Secret or item, or a key "
            "not matching its certificate: the port's connections are dropped (`PROXY_UNAVAILABLE`), "
            "Enforced=False naming the Secret, Warning Event `TLSSecretProblem`"),
    Feature("http-tls-ingress", "`toPorts[].rules.http` in `ingress` with `terminatingTLS` (Secret; optional "
            "`originatingTLS`, `serverNames`)", _E,
            "TLS termination: the node's Envoy terminates the client's TLS with the `terminatingTLS` Secret's "
            "`tls.crt`/`tls.key` (a `ca.crt` there requires a client certificate signed by it), applies the "
            "HTTP rules inside TLS (403 `Access denied`) and forwards an allowed request to the pod: with "
            "`originatingTLS` over a new TLS connection verified against that Secret's `ca.crt` (required) and "
            "the name the client asked for, without it as plain HTTP (as Cilium's proxy does). Plain text from "
            "the peer to the port fails the handshake (closed); with `serverNames` another name is closed and "
            "plain text gets 403 `Access denied` (never another peer's rules). "
            "Secrets as for egress interception (only the intents of nodes hosting selected pods, rotation, "
            "never shown); a missing Secret or item, or a key not matching its certificate: the port's "
            "connections are dropped (`PROXY_UNAVAILABLE`), Enforced=False naming the Secret, Warning Event "
            "`TLSSecretProblem`"),
    Feature("dns", "`toPorts[].rules.dns` (`matchName`, `matchPattern`)", _E,
            "the selected pods' queries on the port go through the node's DNS proxy (UDP and TCP): a name no "
            "rule matches is answered REFUSED, others are forwarded to the server the pod asked; every query "
            "is an L7 flow. The node reports the policy enforcing only while its proxy runs and the redirect is "
            "in place; on a node without a DNS proxy (`--dns-proxy-port 0`) or with it down the queries are "
            "dropped (`PROXY_UNAVAILABLE`), never passed unfiltered"),
    Feature("toFQDNs", "`toFQDNs` (`matchName`, `matchPattern`)", _E,
            "an address is allowed once the pod itself resolved a matching name through the DNS proxy (a "
            "`rules.dns` rule must send its queries there), for the answer's TTL (at least `--fqdn-min-ttl`, "
            "at most `--fqdn-max-ips-per-endpoint` addresses per pod), then no longer; pod and node addresses "
            "in answers are ignored. Reported enforcing only while the node's DNS proxy runs"),
    # --- partial: L3/L4 enforced, the named part not
    Feature("nodeSelector", "`nodeSelector` (CCNP host policy)", _P,
            "not enforced: Ciliary has no host firewall, traffic of the selected nodes is not filtered"),
    Feature("toServices", "`toServices`", _P,
            "not enforced: the item allows nothing (its rule still makes the pods default-deny); "
            "in `egressDeny` it denies nothing"),
    Feature("foreign-secret", "`headerMatches[].secret`, `terminatingTLS.secret` or `originatingTLS.secret` of "
            "another namespace in a CiliumNetworkPolicy", _P,
            "not enforced: a namespaced policy may only use Secrets of its own namespace (the operator reads "
            "every Secret; a header value written into the pod's requests, or a certificate the proxy presents, "
            "would hand another namespace's secret to whoever may write policies here; Cilium's guides put TLS "
            "Secrets in `kube-system`: move them, or write a cluster-wide policy); the port's connections are "
            "dropped (`PROXY_UNAVAILABLE`). A cluster-wide policy may name any namespace"),
    Feature("http-tls", "`toPorts[].rules.http` in `ingress` with `originatingTLS` or `serverNames` but no "
            "`terminatingTLS`; in `egress` with only one of the two contexts, or `serverNames` without both", _P,
            "not enforced (ingress termination needs `terminatingTLS`, egress interception both contexts): "
            "connections to the port are dropped (`PROXY_UNAVAILABLE`), never passed unfiltered; the node "
            "reports the policy not enforcing"),
    Feature("kafka", "`toPorts[].rules.kafka`", _P,
            "not enforced (no Kafka proxy): connections to the port are dropped (`PROXY_UNAVAILABLE`); the "
            "node reports the policy not enforcing"),
    Feature("l7proto", "`toPorts[].rules.l7proto`, `toPorts[].rules.l7`", _P,
            "not enforced (no proxy for these parsers): connections to the port are dropped "
            "(`PROXY_UNAVAILABLE`); the node reports the policy not enforcing"),
    Feature("tls", "`toPorts[].terminatingTLS`, `toPorts[].originatingTLS` without `rules.http`", _P,
            "not enforced: no TLS interception, the connection passes end to end at L3/L4"),
    Feature("serverNames", "`toPorts[].serverNames` without `rules.http`", _P,
            "not enforced: the TLS server name is not checked, every name is allowed on the port"),
    Feature("ipv6-cidr", "IPv6 prefixes in `fromCIDR`/`toCIDR`/`fromCIDRSet`/`toCIDRSet`", _P,
            "not enforced (IPv4-only datapath): they allow (or deny) nothing"),
    Feature("ipv6-icmp", "`icmps` of family IPv6, or names with no IPv4 number", _P,
            "not enforced (IPv4-only datapath): they allow nothing"),
    Feature("ipv6-allowed", "allow rules with `fromEntities`/`toEntities` `all` or `world`, and "
            "`enableDefaultDeny: false` (a default-allow direction)", _P,
            "their IPv4 part is enforced; their IPv6 part is not (IPv4-only datapath): IPv6 to or from the "
            "selected pods is dropped on that direction (`UNSUPPORTED_L3`), although the policy allows it"),
    Feature("unresolved-entities", "`fromEntities`/`toEntities`: `kube-apiserver`, `unmanaged`, `world-ipv6`",
            _P, "not enforced: no address is classified as this entity, so it selects no peer"),
    Feature("unrepresentable-label", "a selector on a pod label key security identities do not carry "
            "(`pod-template-hash`, `controller-revision-hash`, `statefulset.kubernetes.io/pod-name`, "
            "`kubernetes.io/*`, `k8s.io/*`, …)", _P,
            "not enforced as written: pods cannot be told apart by such a key; as in Cilium it counts as absent "
            "on every pod, so `NotIn`/`DoesNotExist` on it hold for every pod and `In`/`Exists` for none"),
    # --- refused
    Feature("nodeSelector-in-cnp", "`nodeSelector` in a CiliumNetworkPolicy", _R,
            "Valid=False (nodeSelector is for CCNPs)"),
    Feature("l7-in-deny", "L7 rules, TLS or `serverNames` in `ingressDeny`/`egressDeny`; `toFQDNs` in "
            "`egressDeny`", _R, "refused by the CRD schema (no such field)"),
    Feature("l7-misuse", "L7 other than DNS on a non-TCP port, DNS rules on ingress, two L7 kinds in one port "
            "rule, L7 on port 0 or without ports, `l7` without `l7proto`", _R, "Valid=False"),
    Feature("unknown-fields", "`toGroups`/`fromGroups`, `toNodes`/`fromNodes`, `authentication`, "
            "`listener`, `cidrGroupRef`, `cidrGroupSelector`", _R,
            "refused by the CRD schema (unknown field); nothing of them is implemented"),
)
"""The table. Every row has a test (tests/unit/operator/policy/test_policy_support.py)."""

BY_KEY = {feature.key: feature for feature in FEATURES}
UNRESOLVED_ENTITIES = frozenset({"kube-apiserver", "unmanaged", "world-ipv6"})


@dataclass(frozen=True, slots=True)
class Gap:
    """One part of one policy that is not enforced exactly as written."""

    path: str
    feature: Feature

    def __str__(self) -> str:
        return f"{self.path}: {self.feature.what}"


def gaps(policy: AnyPolicy) -> tuple[Gap, ...]:
    """Every part of ``policy`` that is not enforced exactly as written (empty: all of it is)."""
    found: list[Gap] = []
    for path, rule in policy.rules_with_paths():
        found.extend(_rule_gaps(rule, path))
        found.extend(_foreign_secret_gaps(rule, path, policy.namespace))
    return tuple(found)


def _foreign_secret_gaps(rule: Rule, path: str, namespace: str) -> Iterator[Gap]:
    sections: tuple[tuple[str, Sequence[IngressRule | EgressRule]], ...] = (
        ("ingress", rule.ingress or ()), ("egress", rule.egress or ()))
    for name, items in sections:
        for i, item in enumerate(items):
            for j, port_rule in enumerate(item.to_ports or ()):
                if isinstance(port_rule, PortRule) and foreign_secret_namespaces(port_rule, namespace):
                    yield _gap(f"{path}.{name}[{i}].toPorts[{j}]", "foreign-secret")


def message(found: Sequence[Gap]) -> str:
    """The gaps grouped by feature, for a condition or an Event (at most ``MAX_MESSAGE`` characters)."""
    by_feature: dict[Feature, list[str]] = {}
    for gap in found:
        by_feature.setdefault(gap.feature, []).append(gap.path)
    parts = [f"{', '.join(paths)}: {feature.what}" for feature, paths in by_feature.items()]
    text = "; ".join(parts)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def render_table() -> str:
    """The table as Markdown (README.md holds exactly this)."""
    lines = ["| construct | enforcement | what Ciliary does |", "| --- | --- | --- |"]
    lines += [f"| {f.construct} | {f.support.value} | {f.what} |" for f in FEATURES]
    return "\n".join(lines)


def _gap(path: str, key: str) -> Gap:
    return Gap(path, BY_KEY[key])


IPV6_ALLOWING_ENTITIES = frozenset({"all", "world"})
"""Entities whose peers include IPv6 addresses, which an enforced direction drops."""


def unrepresentable_keys(selector: LabelSelector | None) -> list[str]:
    """Keys of a CNP selector naming pod labels that identities drop (``identities.is_relevant_pod_label``)."""
    if selector is None:
        return []
    out = []
    for raw in [*(selector.match_labels or {}), *(e.key for e in selector.match_expressions or ())]:
        source, key = selection.parse_key(raw)
        if source not in (selection.K8S_SOURCE, selection.ANY_SOURCE):
            continue
        if key == selection.NAMESPACE_KEY or key.startswith(IDENTITY_KEY_PREFIX):
            continue  # the namespace and Cilium's own keys are on every pod identity
        if not identities.is_relevant_pod_label(key):
            out.append(raw)
    return out


IDENTITY_KEY_PREFIX = "io.cilium.k8s."
"""Namespace labels, service account and cluster: keys Ciliary adds to every pod identity."""


def _selector_gaps(selectors: Iterable[LabelSelector | None], path: str) -> Iterator[Gap]:
    for j, selector in enumerate(selectors):
        if unrepresentable_keys(selector):
            yield _gap(f"{path}[{j}]", "unrepresentable-label")


def _rule_gaps(rule: Rule, path: str) -> Iterator[Gap]:
    if unrepresentable_keys(rule.endpoint_selector):
        yield _gap(f"{path}.endpointSelector", "unrepresentable-label")
    if rule.node_selector is not None:
        yield _gap(f"{path}.nodeSelector", "nodeSelector")
    default_deny = rule.enable_default_deny
    if default_deny is not None:
        for direction in ("ingress", "egress"):
            if getattr(default_deny, direction) is False:
                yield _gap(f"{path}.enableDefaultDeny.{direction}", "ipv6-allowed")
    sections: tuple[tuple[str, Sequence[IngressRule | IngressDenyRule | EgressRule | EgressDenyRule]], ...] = (
        ("ingress", rule.ingress or ()), ("ingressDeny", rule.ingress_deny or ()),
        ("egress", rule.egress or ()), ("egressDeny", rule.egress_deny or ()))
    for name, items in sections:
        for i, item in enumerate(items):
            yield from _item_gaps(item, f"{path}.{name}[{i}]")


def _item_gaps(item: IngressRule | IngressDenyRule | EgressRule | EgressDenyRule, path: str) -> Iterator[Gap]:
    side = "from" if isinstance(item, (IngressRule, IngressDenyRule)) else "to"
    for kind in ("Endpoints", "Requires"):
        selectors = getattr(item, f"{side}_{kind.lower()}", None) or ()
        yield from _selector_gaps(selectors, f"{path}.{side}{kind}")
    cidr_fields: tuple[tuple[str, Sequence[str | CIDRRule] | None], ...]
    if isinstance(item, (IngressRule, IngressDenyRule)):
        cidr_fields = (("fromCIDR", item.from_cidr), ("fromCIDRSet", item.from_cidr_set))
        entity_field, entities = "fromEntities", item.from_entities
    else:
        cidr_fields = (("toCIDR", item.to_cidr), ("toCIDRSet", item.to_cidr_set))
        entity_field, entities = "toEntities", item.to_entities
        if item.to_services:
            yield _gap(f"{path}.toServices", "toServices")
    for name, values in cidr_fields:
        written: Sequence[str | CIDRRule] = values or []
        for j, value in enumerate(written):
            if _is_ipv6(value):
                yield _gap(f"{path}.{name}[{j}]", "ipv6-cidr")
    allowing = isinstance(item, (IngressRule, EgressRule))
    for j, entity in enumerate(entities or ()):
        if entity in UNRESOLVED_ENTITIES:
            yield _gap(f"{path}.{entity_field}[{j}]", "unresolved-entities")
        elif allowing and entity in IPV6_ALLOWING_ENTITIES:
            yield _gap(f"{path}.{entity_field}[{j}]", "ipv6-allowed")
    yield from _icmp_gaps(item.icmps, f"{path}.icmps")
    port_rules: Sequence[PortRule | PortDenyRule] = item.to_ports or ()
    for j, port_rule in enumerate(port_rules):
        if isinstance(port_rule, PortRule):
            yield from _port_rule_gaps(port_rule, f"{path}.toPorts[{j}]", egress=isinstance(item, EgressRule))


def _is_ipv6(value: str | CIDRRule) -> bool:
    text = value.cidr if isinstance(value, CIDRRule) else value
    try:
        return ipaddress.ip_network(text, strict=False).version == 6
    except ValueError:
        return False


def _icmp_gaps(rules: Iterable[ICMPRule] | None, path: str) -> Iterator[Gap]:
    for i, rule in enumerate(rules or ()):
        for j, field in enumerate(rule.fields or ()):
            ipv4_name = isinstance(field.type, int) or field.type.isdigit() or field.type in ICMP_V4_TYPES
            if field.family == "IPv6" or not ipv4_name:
                yield _gap(f"{path}[{i}].fields[{j}]", "ipv6-icmp")


def _port_rule_gaps(rule: PortRule, path: str, *, egress: bool = False) -> Iterator[Gap]:
    l7 = rule.rules
    has_http = l7 is not None and l7.http is not None
    if l7 is not None:
        if l7.http is not None:
            tls_written = rule.terminating_tls is not None or rule.originating_tls is not None or rule.server_names
            intercepted = rule.terminating_tls is not None and (rule.originating_tls is not None or not egress)
            if tls_written and not intercepted:
                yield _gap(f"{path}.rules.http", "http-tls")
        if l7.kafka is not None:
            yield _gap(f"{path}.rules.kafka", "kafka")
        if l7.l7proto is not None or l7.l7 is not None:
            yield _gap(f"{path}.rules.l7proto", "l7proto")
    if has_http or (l7 is not None and l7.kinds()):
        return  # with L7 rules: intercepted, or the port's connections are dropped (the gaps above)
    if rule.terminating_tls is not None:
        yield _gap(f"{path}.terminatingTLS", "tls")
    if rule.originating_tls is not None:
        yield _gap(f"{path}.originatingTLS", "tls")
    if rule.server_names:
        yield _gap(f"{path}.serverNames", "serverNames")
