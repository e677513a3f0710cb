"""headerMatches mismatch actions of several HTTP rules: the routes Envoy gets give the same verdict and the same
rewritten request as a reference model of the policy semantics (every rule that allows a request applies the
actions of its headers that do not match, in rule order), on generated rules and requests.

Envoy's side is simulated from the route documents: routes in order, the first whose matchers all match the
request is taken (header matchers: ``safe_regex`` full match, ``exact``, ``present_match``), then its
``request_headers_to_remove`` and ``request_headers_to_add`` are applied as Envoy applies them.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import envoy_config, envoy_routes
from ciliary.operator import intents
from ciliary.operator.api import parse_policy, validation
from ciliary.operator.policy import header_actions

Request = dict[str, str]


def _matches(matcher: dict[str, Any], request: Request) -> bool:
    value = request.get(matcher["name"].lower())
    if matcher.get("present_match"):
        return value is not None
    if value is None:
        return False
    string_match = matcher["string_match"]
    if "exact" in string_match:
        return bool(value == string_match["exact"])
    return re.fullmatch(string_match["safe_regex"]["regex"], value) is not None


def envoy(routes: list[dict[str, Any]], request: Request) -> tuple[bool, Request]:
    """(allowed, the request as forwarded) under Envoy's first-match routing."""
    for route in routes:
        if all(_matches(m, request) for m in route["match"].get("headers", ())):
            if "direct_response" in route:
                return False, request
            out = dict(request)
            for name in route.get("request_headers_to_remove", ()):
                out.pop(name.lower(), None)
            for add in route.get("request_headers_to_add", ()):
                key, value = add["header"]["key"].lower(), add["header"]["value"]
                if key == envoy_routes.ORIGINAL_DST_HEADER:
                    continue
                if add["append_action"] == "APPEND_IF_EXISTS_OR_ADD" and key in out:
                    out[key] = f"{out[key]},{value}"
                else:
                    out[key] = value
            return True, out
    raise AssertionError("no route matched: the deny route is missing")


def _header_ok(match: intents.HeaderMatch, request: Request) -> bool:
    value = request.get(match.name.lower())
    return value is not None and (not match.value or value == match.value)


def reference(rules: tuple[intents.HttpRule, ...], request: Request) -> tuple[bool, Request]:
    """The policy's meaning: allowed when some rule allows; each allowing rule's mismatched headers act."""
    allowing = [rule for rule in rules
                if (not rule.path or re.fullmatch(rule.path, request.get(":path", "")))
                and (not rule.method or re.fullmatch(rule.method, request.get(":method", "")))
                and all(_header_ok(m, request) for m in rule.header_matches if m.mismatch is None)]
    if not allowing:
        return False, request
    out = dict(request)
    for rule in allowing:
        for match in rule.header_matches:
            if match.mismatch is None or _header_ok(match, request):
                continue
            key = match.name.lower()
            if match.mismatch == "ADD":
                out[key] = f"{out[key]},{match.value}" if key in out else match.value
            elif match.mismatch == "REPLACE":
                out[key] = match.value
            elif match.mismatch == "DELETE" and match.value:
                out.pop(key, None)
    return True, out


NAMES = ("X-A", "X-B", "Token")
VALUES = ("1", "2")
header_matches = st.builds(intents.HeaderMatch, name=st.sampled_from(NAMES), value=st.sampled_from(VALUES),
                           mismatch=st.sampled_from((None, "LOG", "ADD", "DELETE", "REPLACE")))
rules_st = st.lists(st.builds(intents.HttpRule, path=st.sampled_from(("", "/a", "/c", "/a|/b", "/b.*")),
                              method=st.sampled_from(("", "GET", "POST")),
                              header_matches=st.lists(header_matches, max_size=2).map(tuple)),
                    min_size=1, max_size=3).map(tuple)
requests_st = st.fixed_dictionaries(
    {":path": st.sampled_from(("/a", "/b", "/bc", "/c")), ":method": st.sampled_from(("GET", "POST"))},
    optional={name.lower(): st.sampled_from(VALUES) for name in NAMES})


@settings(max_examples=400, deadline=None)
@given(rules=rules_st, requests=st.lists(requests_st, min_size=1, max_size=6))
def test_routes_apply_every_allowing_rules_actions(rules: tuple[intents.HttpRule, ...], requests: list[Request]) -> None:
    routes = envoy_routes.routes(rules)
    for request in requests:
        assert envoy(routes, request) == reference(rules, request), (rules, request)


def test_two_rules_both_act_and_the_flow_names_the_first() -> None:
    """The case the first-match routes got wrong before: a request both rules allow gets both rules' actions."""
    first = intents.HttpRule(path="/a", header_matches=(intents.HeaderMatch(name="X-A", value="1", mismatch="ADD"),))
    second = intents.HttpRule(method="GET", header_matches=(
        intents.HeaderMatch(name="Token", value="2", mismatch="REPLACE"),))
    routes = envoy_routes.routes((first, second))
    allowed, out = envoy(routes, {":path": "/a", ":method": "GET", "token": "9"})
    assert allowed and out["x-a"] == "1" and out["token"] == "2", out
    taken = next(r for r in routes if all(_matches(m, {":path": "/a", ":method": "GET", "token": "9"})
                                          for m in r["match"].get("headers", ())))
    assert taken["metadata"]["filter_metadata"]["ciliary"]["mismatch"] == "X-A:ADD,Token:REPLACE"
    # only the second allows: only its action
    assert envoy(routes, {":path": "/c", ":method": "GET"}) == (True, {":path": "/c", ":method": "GET", "token": "2"})
    # a plain rule listed first no longer hides the acting rule's action
    plain = intents.HttpRule(path="/a")
    assert envoy(envoy_routes.routes((plain, first)), {":path": "/a"}) == (True, {":path": "/a", "x-a": "1"})


def _acting(n: int, tag: str = "") -> intents.HttpRule:
    return intents.HttpRule(header_matches=tuple(intents.HeaderMatch(name=f"X-{tag}{i}", value="1", mismatch="ADD")
                                                 for i in range(n)))


def test_too_many_action_routes_stop_the_configuration_never_cut_it_short() -> None:
    assert len(envoy_routes.routes((_acting(4), _acting(4)))) == 17 * 17 - 1 + 1  # 288 + the deny route
    with pytest.raises(envoy_routes.RouteLimitError, match="need more than 512 proxy routes"):
        envoy_routes.routes((_acting(4), _acting(4), _acting(4)))
    # the chain alone fails closed: it denies every request, the node's other chains are written
    hcm = envoy_config._http_filter("10.0.0.5:80/any", (_acting(4), _acting(4), _acting(4)), "/dev/null",
                                    envoy_config._Routes())  # routes inline
    only = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in only] == [envoy_routes.DENY_ROUTE]
    assert "need more than 512 proxy routes" in envoy_routes.route_limit_problem((_acting(4),) * 3)
    assert envoy_routes.route_limit_problem((_acting(4),) * 2) == "" and envoy_routes.route_limit_problem(None) == ""
    # rules that can never allow one request together (different literal paths) are not combined
    apart = tuple(r.model_copy(update={"path": f"/p{i}"}) for i, r in enumerate([_acting(4)] * 20))
    assert len(envoy_routes.routes(apart)) == 20 * 16 + 1


def test_validation_refuses_a_port_rule_needing_too_many_routes() -> None:
    def policy(n_rules: int, paths: bool = False) -> dict[str, Any]:
        http = [{"headerMatches": [{"name": f"X-{i}", "value": "1", "mismatch": "ADD"} for i in range(4)],
                 **({"path": f"/p{n}"} if paths else {})} for n in range(n_rules)]
        return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                                                           "rules": {"http": http}}]}]}}

    assert not [p for p in validation.validate_policy(parse_policy(policy(2))) if "proxy routes" in p.message]
    problems = [p for p in validation.validate_policy(parse_policy(policy(3))) if "proxy routes" in p.message]
    assert [p.path for p in problems] == ["spec.ingress[0].toPorts[0].rules.http"], problems
    assert "need more than 512 proxy routes" in problems[0].message
    assert not [p for p in validation.validate_policy(parse_policy(policy(20, paths=True))) if "proxy routes" in p.message]


def test_action_sets_leave_out_rules_that_cannot_overlap() -> None:
    rule = header_actions.ActingRule
    sets = header_actions.action_sets([rule("GET", "/a", "", 1), rule("", "/b", "", 1), rule("", ".*", "", 1),
                                       rule("POST", "", "", 1)])
    # /a and /b never together, GET and POST never together; the regex overlaps everything
    assert sets.sets == ((1, 2, 3), (0, 2), (1, 2), (1, 3), (2, 3), (0,), (1,), (2,), (3,))
    assert sets.routes == 8 + 4 * 4 + 4 * 2 and not sets.over


def test_an_over_limit_chain_denies_alone_and_is_named() -> None:
    """Two peers of one pod's port: tiefighter's rules need too many routes, xwing's do not. tiefighter's chain
    denies every request and is named (the agent reports the node's L7 policies not enforced); xwing's keeps
    its routes: the node's configuration is still written, never left at the last one."""
    from test_envoy_config import TIEFIGHTER, XWING, entry, node_intent, routes_of

    intent = node_intent(entry(TIEFIGHTER, http=(_acting(4, "a"), _acting(4, "b"), _acting(4, "c"))),
                         entry(XWING, http=(_acting(1),)))
    assert envoy_config.route_limit_chains(intent) == ["10.244.1.5:80/id301"]
    doc = envoy_config.listener(intent, port=15001, access_log="/x/access.log")
    assert doc is not None
    by_name = {c["name"]: c for c in doc["filter_chains"]}
    assert [r["name"] for r in routes_of(by_name["10.244.1.5:80/id301"])] == [envoy_routes.DENY_ROUTE]
    assert len(routes_of(by_name["10.244.1.5:80/id302"])) == 2 + 1
