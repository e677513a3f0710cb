"""Egress rules.http translated into entries: redirecting to the HTTP proxy, with their rules (TCP only)."""

from __future__ import annotations

from test_policy_resolution import WEB, cnp, state_of  # type: ignore[import-not-found]

from ciliary.operator import intents
from ciliary.operator.policy.resolution import resolve_cluster


def test_operator_carries_egress_http_rules_on_redirecting_entries() -> None:
    state = state_of(cnp({"endpointSelector": WEB, "egress": [
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                                     "rules": {"http": [{"method": "GET", "path": "/public"}]}}]},
        {"toEntities": ["world"], "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                                "rules": {"http": [{}]}}]}]}))
    web = next(e for e in resolve_cluster(state)["n1"].endpoints if e.pod == "web" and e.namespace == "a")
    by_port = {(e.protocol, e.port_low): e for e in web.egress.entries if e.port_low}
    tcp80 = by_port[(intents.Protocol.TCP, 80)]
    assert (tcp80.l7_redirect, tcp80.l7_parser) == (True, "http")
    assert tcp80.http is not None and [(h.method, h.path) for h in tcp80.http] == [("GET", "/public")]
    assert tcp80.http[0].rule is not None and tcp80.http[0].rule.section == "egress[0]"
    assert by_port[(intents.Protocol.TCP, 8080)].http == (intents.HttpRule(rule=tcp80.http[0].rule.model_copy(
        update={"section": "egress[1]"})),)
    # an L4 allow of the same peer and port wins: no redirect, no rules
    both = state_of(cnp({"endpointSelector": WEB, "egress": [
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                                     "rules": {"http": [{"method": "GET"}]}}]},
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}))
    web = next(e for e in resolve_cluster(both)["n1"].endpoints if e.pod == "web" and e.namespace == "a")
    assert [(e.l7_redirect, e.http) for e in web.egress.entries if e.port_low == 80] == [(False, None)]


def test_header_matches_ride_on_the_rule_with_their_secret_references() -> None:
    state = state_of(cnp({"endpointSelector": WEB, "egress": [
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [
            {"path": "/private", "headerMatches": [
                {"name": "Access-Token", "value": "s3cret", "mismatch": "REPLACE"}, {"name": "X-Need"},
                {"name": "X-From-Secret", "value": "fallback", "secret": {"name": "tok"}, "mismatch": "LOG"},
                {"name": "X-Other", "secret": {"namespace": "a", "name": "t2"}}]}]}}]}]}))
    web = next(e for e in resolve_cluster(state)["n1"].endpoints if e.pod == "web" and e.namespace == "a")
    http = next(e for e in web.egress.entries if e.port_low == 80).http
    assert http is not None and http[0].header_matches == (
        intents.HeaderMatch(name="Access-Token", value="s3cret", mismatch="REPLACE"),
        intents.HeaderMatch(name="X-Need"),
        intents.HeaderMatch(name="X-From-Secret", value="fallback", mismatch="LOG",
                            secret=intents.SecretRef(namespace="a", name="tok")),
        intents.HeaderMatch(name="X-Other", secret=intents.SecretRef(namespace="a", name="t2")))
