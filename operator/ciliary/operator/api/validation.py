"""Semantic checks of a parsed policy: what the CRD schema cannot express.

Owns :func:`validate_policy`, a pure function from a parsed
:class:`~ciliary.operator.api.policies.CiliumNetworkPolicy` or
:class:`~ciliary.operator.api.policies.CiliumClusterwideNetworkPolicy` to the
list of :class:`~ciliary.operator.api.errors.PolicyProblem` found (empty means
valid). The CNP/CCNP handlers call it right after ``parse_policy`` and set the
``Valid`` condition from the result.

Checks made here (the schema and the models already refuse unknown fields,
bad enums, out-of-range ports, malformed port names and L7 rules inside deny
rules, whose port rules have no ``rules`` field at all):

* L7 rules other than DNS on a port whose protocol is not TCP; L7 rules on
  port 0 or without ports; more than one L7 kind in one port rule;
* DNS rules on ingress;
* HTTP ``path``/``method``/``host`` that are not valid regular expressions;
* DNS names and patterns (``toFQDNs``, ``rules.dns``) with illegal characters,
  or with both or neither of matchName/matchPattern;
* CIDRs that do not parse, and ``except`` prefixes outside their ``cidr``;
* ``endPort`` below ``port``, and ``endPort`` with a named port;
* label requirements whose values do not fit their operator;
* ``nodeSelector`` in a (namespaced) CiliumNetworkPolicy; an object with
  neither ``spec`` nor ``specs``; rule labels using the reserved
  ``cilium-generated`` source; ``toServices`` entries with both or neither form.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from ciliary.operator.api.errors import PolicyProblem
from ciliary.operator.api.policies import AnyPolicy
from ciliary.operator.api.ports import (
    PORT_NAME,
    FQDNSelector,
    L7Rules,
    PortDenyRule,
    PortProtocol,
    PortRule,
    PortRuleHTTP,
)
from ciliary.operator.api.rules import (
    CIDRRule,
    EgressDenyRule,
    EgressRule,
    IngressDenyRule,
    IngressRule,
    Rule,
    ServiceSelector,
)
from ciliary.operator.api.selectors import LabelSelector
from ciliary.operator.policy import header_actions

__all__ = ["PolicyProblem", "validate_policy"]

DNS_NAME = re.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")
DNS_PATTERN = re.compile(r"^([-a-zA-Z0-9_*]+[.]?)+$")
KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]*$")

# The proxy evaluates HTTP regexes with RE2 (Envoy's safe_regex), while this
# check compiles them with Python's ``re``. The two mostly agree on syntax, but
# Python accepts constructs RE2 refuses (lookahead/lookbehind, backreferences,
# atomic groups, possessive quantifiers); the first three are refused
# explicitly below (possessive quantifiers are left to the proxy).
# RE2 accepts a few things Python does not (e.g. \pL, \C); a pattern using them
# is reported as invalid here, which errs on the side of refusing.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\(\?>|(?<!\\)\\[1-9]")


def validate_policy(policy: AnyPolicy) -> list[PolicyProblem]:
    """Return every semantic problem of ``policy``; an empty list means it is valid."""
    problems: list[PolicyProblem] = []
    rules = policy.rules_with_paths()
    if not rules:
        problems.append(PolicyProblem("spec", "the policy has neither spec nor specs, so it has no rules"))
    for path, rule in rules:
        problems.extend(_check_rule(rule, path, clusterwide=policy.is_clusterwide))
    return problems


def _check_rule(rule: Rule, path: str, *, clusterwide: bool) -> Iterable[PolicyProblem]:
    if rule.node_selector is not None and not clusterwide:
        yield PolicyProblem(
            f"{path}.nodeSelector",
            "nodeSelector selects nodes and can only be used in a CiliumClusterwideNetworkPolicy",
        )
    if rule.endpoint_selector is not None:
        yield from _check_selector(rule.endpoint_selector, f"{path}.endpointSelector")
    if rule.node_selector is not None:
        yield from _check_selector(rule.node_selector, f"{path}.nodeSelector")
    for i, label in enumerate(rule.labels or ()):
        if label.source == "cilium-generated":
            yield PolicyProblem(f"{path}.labels[{i}].source", 'the source "cilium-generated" is reserved')
    for i, ingress in enumerate(rule.ingress or ()):
        yield from _check_ingress(ingress, f"{path}.ingress[{i}]")
    for i, ingress_deny in enumerate(rule.ingress_deny or ()):
        yield from _check_ingress(ingress_deny, f"{path}.ingressDeny[{i}]")
    for i, egress in enumerate(rule.egress or ()):
        yield from _check_egress(egress, f"{path}.egress[{i}]")
    for i, egress_deny in enumerate(rule.egress_deny or ()):
        yield from _check_egress(egress_deny, f"{path}.egressDeny[{i}]")


def _check_ingress(rule: IngressRule | IngressDenyRule, path: str) -> Iterable[PolicyProblem]:
    yield from _check_selectors(rule.from_endpoints, f"{path}.fromEndpoints")
    yield from _check_selectors(rule.from_requires, f"{path}.fromRequires")
    yield from _check_cidrs(rule.from_cidr, f"{path}.fromCIDR")
    yield from _check_cidr_sets(rule.from_cidr_set, f"{path}.fromCIDRSet")
    port_rules: Sequence[PortRule | PortDenyRule] = rule.to_ports or ()
    for i, port_rule in enumerate(port_rules):
        yield from _check_port_rule(port_rule, f"{path}.toPorts[{i}]", ingress=True)


def _check_egress(rule: EgressRule | EgressDenyRule, path: str) -> Iterable[PolicyProblem]:
    yield from _check_selectors(rule.to_endpoints, f"{path}.toEndpoints")
    yield from _check_selectors(rule.to_requires, f"{path}.toRequires")
    yield from _check_cidrs(rule.to_cidr, f"{path}.toCIDR")
    yield from _check_cidr_sets(rule.to_cidr_set, f"{path}.toCIDRSet")
    for i, service in enumerate(rule.to_services or ()):
        yield from _check_service(service, f"{path}.toServices[{i}]")
    if isinstance(rule, EgressRule):
        for i, fqdn in enumerate(rule.to_fqdns or ()):
            yield from _check_fqdn(fqdn, f"{path}.toFQDNs[{i}]")
    port_rules: Sequence[PortRule | PortDenyRule] = rule.to_ports or ()
    for i, port_rule in enumerate(port_rules):
        yield from _check_port_rule(port_rule, f"{path}.toPorts[{i}]", ingress=False)


# --- selectors -------------------------------------------------------------------------------


def _check_selectors(selectors: Iterable[LabelSelector] | None, path: str) -> Iterable[PolicyProblem]:
    for i, selector in enumerate(selectors or ()):
        yield from _check_selector(selector, f"{path}[{i}]")


def _check_selector(selector: LabelSelector, path: str) -> Iterable[PolicyProblem]:
    for i, requirement in enumerate(selector.match_expressions or ()):
        where = f"{path}.matchExpressions[{i}].values"
        if requirement.operator in ("In", "NotIn") and not requirement.values:
            yield PolicyProblem(where, f"operator {requirement.operator} needs at least one value")
        if requirement.operator in ("Exists", "DoesNotExist") and requirement.values:
            yield PolicyProblem(where, f"operator {requirement.operator} takes no values")


# --- CIDRs, services, FQDNs ------------------------------------------------------------------


def _parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _check_cidrs(cidrs: Iterable[str] | None, path: str) -> Iterable[PolicyProblem]:
    for i, cidr in enumerate(cidrs or ()):
        if _parse_cidr(cidr) is None:
            yield PolicyProblem(f"{path}[{i}]", f'"{cidr}" is not a valid CIDR prefix')


def _check_cidr_sets(sets: Iterable[CIDRRule] | None, path: str) -> Iterable[PolicyProblem]:
    for i, cidr_rule in enumerate(sets or ()):
        network = _parse_cidr(cidr_rule.cidr)
        if network is None:
            yield PolicyProblem(f"{path}[{i}].cidr", f'"{cidr_rule.cidr}" is not a valid CIDR prefix')
            continue
        for j, excluded in enumerate(cidr_rule.except_ or ()):
            where = f"{path}[{i}].except[{j}]"
            carved = _parse_cidr(excluded)
            if carved is None:
                yield PolicyProblem(where, f'"{excluded}" is not a valid CIDR prefix')
            elif carved.version != network.version or not carved.subnet_of(network):  # type: ignore[arg-type]
                yield PolicyProblem(where, f"except {excluded} is not inside cidr {cidr_rule.cidr}")


def _check_service(service: ServiceSelector, path: str) -> Iterable[PolicyProblem]:
    if (service.k8s_service is None) == (service.k8s_service_selector is None):
        yield PolicyProblem(path, "set exactly one of k8sService or k8sServiceSelector")
    if service.k8s_service_selector is not None:
        yield from _check_selector(
            service.k8s_service_selector.selector, f"{path}.k8sServiceSelector.selector"
        )


def _check_fqdn(fqdn: FQDNSelector, path: str) -> Iterable[PolicyProblem]:
    if (fqdn.match_name is None) == (fqdn.match_pattern is None):
        yield PolicyProblem(path, "set exactly one of matchName or matchPattern")
    if fqdn.match_name is not None and not DNS_NAME.match(fqdn.match_name):
        yield PolicyProblem(
            f"{path}.matchName",
            f'"{fqdn.match_name}" contains characters not allowed in a DNS name '
            "(letters, digits, '-', '_' and '.')",
        )
    if fqdn.match_pattern is not None and not DNS_PATTERN.match(fqdn.match_pattern):
        yield PolicyProblem(
            f"{path}.matchPattern",
            f'"{fqdn.match_pattern}" contains characters not allowed in a DNS pattern '
            "(letters, digits, '-', '_', '.' and '*')",
        )


# --- ports and L7 ----------------------------------------------------------------------------


def _check_port(port: PortProtocol, path: str) -> Iterable[PolicyProblem]:
    if port.is_named and port.port is not None and not PORT_NAME.match(port.port):
        yield PolicyProblem(f"{path}.port", f'"{port.port}" is not a valid port name')
    if port.end_port is None or port.end_port == 0:
        return
    if port.is_named:
        yield PolicyProblem(
            f"{path}.endPort", f'endPort needs a numeric port, but port is the name "{port.port}"'
        )
    elif port.number is not None and port.end_port < port.number:
        yield PolicyProblem(f"{path}.endPort", f"endPort {port.end_port} is lower than port {port.number}")


def _check_port_rule(rule: PortRule | PortDenyRule, path: str, *, ingress: bool) -> Iterable[PolicyProblem]:
    ports = rule.ports or ()
    for i, port in enumerate(ports):
        yield from _check_port(port, f"{path}.ports[{i}]")
    if isinstance(rule, PortRule) and rule.rules is not None:
        yield from _check_l7(rule.rules, ports, path, ingress=ingress)


def _check_l7(
    rules: L7Rules, ports: tuple[PortProtocol, ...], path: str, *, ingress: bool
) -> Iterable[PolicyProblem]:
    where = f"{path}.rules"
    kinds = rules.kinds()
    if len(kinds) > 1:
        yield PolicyProblem(
            where, f"only one kind of L7 rule may be set per port rule, found {' and '.join(kinds)}"
        )
    if kinds and not ports:
        yield PolicyProblem(where, "L7 rules need at least one port in 'ports'")
    for i, port in enumerate(ports):
        if kinds and port.number == 0:
            yield PolicyProblem(f"{path}.ports[{i}].port", "L7 rules cannot be used with port 0 (all ports)")
        elif kinds and port.end_port is not None and port.number and \
                port.end_port - port.number + 1 > MAX_L7_RANGE_PORTS:
            yield PolicyProblem(f"{path}.ports[{i}].endPort",
                                f"L7 rules cover at most {MAX_L7_RANGE_PORTS} ports per range (the node's proxy "
                                f"listens per port), found {port.end_port - port.number + 1}")
        for kind in kinds:
            if kind != "dns" and port.protocol != "TCP":
                yield PolicyProblem(
                    f"{path}.ports[{i}].protocol",
                    f"{kind} rules need protocol TCP, not {port.protocol or 'ANY'}; "
                    "only DNS rules work over other protocols",
                )
    if rules.dns is not None and ingress:
        yield PolicyProblem(f"{where}.dns", "DNS rules are only allowed in egress rules, not in ingress")
    for i, dns in enumerate(rules.dns or ()):
        yield from _check_fqdn(dns, f"{where}.dns[{i}]")
    for i, http in enumerate(rules.http or ()):
        yield from _check_http(http, f"{where}.http[{i}]")
    acting = [header_actions.ActingRule(http.method or "", http.path or "", http.host or "",
                                        sum(1 for m in http.header_matches or () if m.mismatch is not None))
              for http in rules.http or ()]
    sets = header_actions.action_sets([rule for rule in acting if rule.actions])
    if sets.over:
        yield PolicyProblem(f"{where}.http", f"these rules' headerMatches with mismatch actions need more than "
                                             f"{header_actions.MAX_ROUTES} proxy routes (each set of rules that can "
                                             f"allow a request together gets a route per combination of their action "
                                             f"headers): fewer rules or fewer headers with actions, or literal "
                                             f"paths that tell the rules apart")
    for i, kafka in enumerate(rules.kafka or ()):
        if kafka.role is not None and kafka.api_key is not None:
            yield PolicyProblem(f"{where}.kafka[{i}]", "role and apiKey are mutually exclusive")
        if kafka.topic is not None and not KAFKA_TOPIC.match(kafka.topic):
            yield PolicyProblem(
                f"{where}.kafka[{i}].topic", f'"{kafka.topic}" is not a valid Kafka topic name'
            )
    if rules.l7 is not None and not rules.l7proto:
        yield PolicyProblem(f"{where}.l7", "l7 rules need l7proto to name their parser")


def _check_http(rule: PortRuleHTTP, path: str) -> Iterable[PolicyProblem]:
    for field in ("path", "method", "host"):
        pattern = getattr(rule, field)
        if pattern is None:
            continue
        problem = regex_problem(pattern)
        if problem is not None:
            yield PolicyProblem(
                f"{path}.{field}", f'"{pattern}" is not a valid regular expression: {problem}'
            )
    for i, header in enumerate(rule.headers or ()):
        if not header.split(":", 1)[0].strip():
            yield PolicyProblem(f"{path}.headers[{i}]", 'a header must be "Name" or "Name: value"')
    acting = [m for m in rule.header_matches or () if m.mismatch is not None]
    if len(acting) > MAX_HEADER_ACTIONS:
        yield PolicyProblem(f"{path}.headerMatches", f"at most {MAX_HEADER_ACTIONS} header matches with a "
                                                     f"mismatch action per rule, found {len(acting)}")
    for i, match in enumerate(rule.header_matches or ()):
        if not HEADER_NAME.match(match.name) or match.name.lower() == "host" \
                or match.name.lower().startswith(PROXY_HEADER_PREFIX):
            yield PolicyProblem(f"{path}.headerMatches[{i}].name",
                                f'"{match.name}" is not a header name the proxy can match and rewrite')


MAX_HEADER_ACTIONS = 4
MAX_L7_RANGE_PORTS = 256
"""Ports of one range with L7 rules (the node's Envoy has a filter chain per port: nodeagent envoy_config's
``MAX_RANGE_PORTS``; a wider range would stop the whole node's proxy configuration, so it is refused here)."""
"""The proxy gives a rule one route per combination of its mismatch-action headers (2**n)."""
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
"""An HTTP header name (RFC 9110 token); pseudo-headers (``:path``) and ``host`` cannot be rewritten."""
PROXY_HEADER_PREFIX = "x-envoy-"
"""Headers the node's proxy acts on (e.g. the original destination it forwards to): never matched or rewritten
by a policy (a REPLACE of one could send an allowed request to any address past the destination's policy)."""


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a regex the proxy (RE2) can use, or None when it is fine."""
    if _RE2_UNSUPPORTED.search(pattern):
        return "lookaround, backreferences and atomic groups are not supported"
    try:
        re.compile(pattern)
    except re.error as error:
        return str(error)
    return None
