"""The routes of one HTTP filter chain of the node's Envoy, from HTTP rules (pure: no I/O).

Owns :func:`routes` (a chain's route list: the allowed kinds of request, then the 403),
:func:`route_name`/:func:`rule_of_route` (a route is named after its policy rule, as JSON, so
the access log names the deciding rule) and the constants of the forwarding routes.

Rule semantics: ``method``/``path``/``host`` are RE2 regular expressions matched against the
whole ``:method``/``:path``/``:authority``; ``headers`` entries ``"Name"`` require presence,
``"Name: value"`` the exact value; ``headerMatches`` without ``mismatch`` likewise (an empty
value: presence). A header match with a mismatch action never stops the rule from allowing:
Envoy evaluates routes in order and picks the first that matches, so such a rule becomes one
route per combination of its action headers matching or not (a route requires the matching
ones; routes with more matching headers come first, so the first route that matches names
exactly the headers that match), and each route applies
the actions of the headers it saw not matching: ``ADD`` appends the value, ``REPLACE`` sets it,
``DELETE`` removes the header (nothing for a presence-only match), ``LOG`` changes nothing;
all four name the mismatch in the route's metadata, which the access log carries into the flow.
When several rules allow a request, the actions of every one of them apply (as Cilium's proxy runs the
header actions of each matching rule): the rules with actions get routes for each set of them
allowing together, largest sets first, so the first route that matches requires exactly the rules
that allow the request (see :func:`routes`); rules without actions follow them. Every rule's headers are
matched against the request as it arrived, and the actions of the allowing rules apply as if one after the
other in rule order. A header value from a Secret is the intent's
(``header_secrets``, :func:`with_secret_values`); a rule whose Secret value is missing allows
nothing.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ciliary.operator import intents
from ciliary.operator.policy import header_actions

CLUSTER_NAME = "cy_original_dst"
EGRESS_CLUSTER_NAME = "cy_egress_original_dst"
DENY_ROUTE = "cy-default-deny"
DENY_BODY = "Access denied\r\n"
ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
"""Set by every forwarding route (overwriting a client's): where the original-destination cluster connects."""


def route_name(rule: intents.RuleRef | None) -> str:
    """The route's name: its policy rule as compact JSON (read back from the access log)."""
    if rule is None:
        return "cy-allow"
    return json.dumps(rule.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _header_matcher(name: str, value: str) -> dict[str, Any]:
    if value:
        return {"name": name, "string_match": {"exact": value}}
    return {"name": name, "present_match": True}


def _header_matchers(rule: intents.HttpRule) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, regex in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)):
        if regex:
            out.append({"name": name, "string_match": {"safe_regex": {"regex": regex}}})
    for header in rule.headers:
        name, _sep, value = header.partition(":")
        out.append(_header_matcher(name.strip(), value.strip()))
    out.extend(_header_matcher(m.name, m.value) for m in rule.header_matches if m.mismatch is None)
    return out


def _on_mismatch(match: intents.HeaderMatch) -> dict[str, Any]:
    """What a route does for a header with a mismatch action that does not match (LOG: nothing)."""
    if match.mismatch == "ADD":
        return {"request_headers_to_add": [{"header": {"key": match.name, "value": match.value},
                                            "append_action": "APPEND_IF_EXISTS_OR_ADD"}]}
    if match.mismatch == "REPLACE":
        return {"request_headers_to_add": [{"header": {"key": match.name, "value": match.value},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
    if match.mismatch == "DELETE" and match.value:
        return {"request_headers_to_remove": [match.name]}
    return {}


def with_secret_values(intent: intents.NodeIntent) -> intents.NodeIntent:
    """``intent`` with each header match naming a Secret given that Secret's value (``header_secrets``) as its
    own; a match whose value the intent lacks keeps its Secret (its rule then allows nothing:
    :func:`_rule_routes`). The result is only for rendering Envoy's configuration, never published."""
    if not intent.header_secrets:
        return intent

    def rule_of(rule: intents.HttpRule) -> intents.HttpRule:
        if not any(m.secret is not None for m in rule.header_matches):
            return rule
        matches = tuple(m.model_copy(update={"value": intent.header_secrets[m.secret.key()].value, "secret": None})
                        if m.secret is not None and m.secret.key() in intent.header_secrets else m
                        for m in rule.header_matches)
        return rule.model_copy(update={"header_matches": matches})

    def entry_of(entry: intents.PolicyEntry) -> intents.PolicyEntry:
        return entry if entry.http is None else entry.model_copy(update={"http": tuple(map(rule_of, entry.http))})

    endpoints = tuple(e.model_copy(update={
        "ingress": e.ingress.model_copy(update={"entries": tuple(map(entry_of, e.ingress.entries))}),
        "egress": e.egress.model_copy(update={"entries": tuple(map(entry_of, e.egress.entries))})})
        for e in intent.endpoints)
    return intent.model_copy(update={"endpoints": endpoints})


class RouteLimitError(ValueError):
    """The rules of one chain would need more than ``header_actions.MAX_ROUTES`` routes."""


def _acting(rule: intents.HttpRule) -> list[intents.HeaderMatch]:
    return [m for m in rule.header_matches if m.mismatch is not None]


def _together_routes(rules: tuple[intents.HttpRule, ...], cluster: str) -> list[dict[str, Any]]:
    """The routes of the rules in ``rules`` allowing one request together: each route requires every rule's
    own matchers and the action headers it names as matching, and applies the actions of the others (in
    rule order). Largest combinations of matching headers first; named after the first rule."""
    base = [m for rule in rules for m in _header_matchers(rule)]
    acting = [m for rule in rules for m in _acting(rule)]
    out = []
    # most matching headers first: the first route whose headers all match is then the one naming
    # exactly the matching set (Envoy's inverted matchers never match an absent header: not used)
    combinations = sorted(itertools.product((True, False), repeat=len(acting)), key=lambda c: -sum(c))
    for combination in combinations:
        route = _forward(route_name(rules[0].rule), base + [
            _header_matcher(m.name, m.value) for m, ok in zip(acting, combination, strict=True) if ok], cluster)
        missed = [m for m, ok in zip(acting, combination, strict=True) if not ok]
        for match in _in_envoys_order(missed):
            for key, items in _on_mismatch(match).items():
                route.setdefault(key, []).extend(items)
        if missed:
            route["metadata"] = {"filter_metadata": {"ciliary": {"mismatch": ",".join(
                f"{m.name}:{m.mismatch}" for m in missed)}}}
        out.append(_destination_last(route))
    return out


def _in_envoys_order(missed: list[intents.HeaderMatch]) -> list[intents.HeaderMatch]:
    """The actions of ``missed`` (in rule order) that Envoy, which removes a route's headers before it adds any,
    must be given for the same result as applying them one after the other: an ``ADD``/``REPLACE`` of a header
    that a later ``DELETE`` removes is left out."""
    last_delete = {m.name.lower(): i for i, m in enumerate(missed) if m.mismatch == "DELETE" and m.value}
    return [m for i, m in enumerate(missed) if i >= last_delete.get(m.name.lower(), -1)]


def _action_sets(acting: list[intents.HttpRule]) -> header_actions.ActionSets:
    return header_actions.action_sets([header_actions.ActingRule(r.method, r.path, r.host, len(_acting(r)))
                                       for r in acting])


def route_limit_problem(rules: tuple[intents.HttpRule, ...] | None) -> str:
    """Why a chain with ``rules`` cannot get its routes ("" when it can): its rules with headerMatches actions
    would need more than ``header_actions.MAX_ROUTES`` routes (the chain then denies every request)."""
    if not rules:
        return ""
    acting = [rule for rule in _held(rules) if _acting(rule)]
    return _limit_message(acting) if _action_sets(acting).over else ""


def _held(rules: tuple[intents.HttpRule, ...]) -> list[intents.HttpRule]:
    """The rules that can allow anything: not those with a header value from a Secret the intent lacks."""
    return [rule for rule in rules if not any(m.secret is not None for m in rule.header_matches)]


def _limit_message(acting: list[intents.HttpRule]) -> str:
    return (f"{len(acting)} HTTP rules with headerMatches mismatch actions on one port and peer need more than "
            f"{header_actions.MAX_ROUTES} proxy routes: fewer rules or fewer headers with actions, or literal "
            f"paths that tell the rules apart")


def _rule_routes(rules: tuple[intents.HttpRule, ...], cluster: str) -> list[dict[str, Any]]:
    """The allowing routes of a chain's rules. Rules with mismatch-action headers: a route set per non-empty
    subset of them, larger subsets first (a request allowed by the rules M first matches a route of a subset
    of M, and the subsets as large as M come first, so the route taken is M's own: every allowing rule's
    actions apply); then the rules without actions, one route each. No route for a rule with a header value
    from a Secret it does not hold (fail closed: it allows nothing)."""
    held = _held(rules)
    acting = [rule for rule in held if _acting(rule)]
    sets = _action_sets(acting)
    if sets.over:
        raise RouteLimitError(_limit_message(acting))
    out = []
    for chosen in sets.sets:
        out.extend(_together_routes(tuple(acting[i] for i in chosen), cluster))
    out.extend(route for rule in held if not _acting(rule) for route in _together_routes((rule,), cluster))
    return out


def _destination_last(route: dict[str, Any]) -> dict[str, Any]:
    """The original-destination header is the proxy's own, set after every action (Envoy applies the list in
    order); an action naming it is left out (validation refuses such names too), so no policy can point
    the proxy at another address."""
    reserved = ORIGINAL_DST_HEADER.lower()
    adds = route.get("request_headers_to_add", [])
    own = [a for a in adds if a["header"]["key"] == ORIGINAL_DST_HEADER
           and a["header"]["value"] == "%DOWNSTREAM_LOCAL_ADDRESS%"]
    route["request_headers_to_add"] = [a for a in adds if a["header"]["key"].lower() != reserved] + own[:1]
    if "request_headers_to_remove" in route:
        route["request_headers_to_remove"] = [h for h in route["request_headers_to_remove"] if h.lower() != reserved]
    return route


def _forward(name: str, headers: list[dict[str, Any]], cluster: str = CLUSTER_NAME) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": "/"}
    if headers:
        match["headers"] = headers
    # the original-destination cluster connects to the address in this header: the connection's
    # local address, which for the transparent listener is the pod's address and port
    return {"name": name, "match": match, "route": {"cluster": cluster, "timeout": "0s"},
            "request_headers_to_add": [{"header": {"key": ORIGINAL_DST_HEADER, "value": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}


def routes(rules: tuple[intents.HttpRule, ...] | None, cluster: str = CLUSTER_NAME) -> list[dict[str, Any]]:
    """A chain's routes: one per allowed kind of request, then the 403."""
    out = [_forward("cy-allow", [], cluster)] if rules is None else _rule_routes(rules, cluster)
    out.append({"name": DENY_ROUTE, "match": {"prefix": "/"},
                "direct_response": {"status": 403, "body": {"inline_string": DENY_BODY}}})
    return out


def rule_of_route(name: str) -> intents.RuleRef | None:
    """The policy rule a route name (from the access log) stands for; None for the default routes."""
    if not name.startswith("{"):
        return None
    try:
        return intents.RuleRef.model_validate(json.loads(name))
    except ValueError:
        return None
