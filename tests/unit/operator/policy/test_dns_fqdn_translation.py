"""rules.dns and toFQDNs translated into entries: DNS rules on redirecting entries, selector identities."""

from __future__ import annotations

from typing import Any

from test_policy_resolution import WEB, cnp, state_of  # type: ignore[import-not-found]

from ciliary.operator.intents import DNSRule, Protocol, Verdict
from ciliary.operator.policy.identities import FIRST_FQDN_SELECTOR_IDENTITY
from ciliary.operator.policy.resolution import Resolver, resolve_cluster

DNS_PORTS = [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}]


def web_egress(intents: Any) -> Any:
    return next(e for e in intents["n1"].endpoints if e.pod == "web" and e.namespace == "a").egress


def test_dns_rules_ride_on_redirecting_entries_and_add_up() -> None:
    state = state_of(cnp({"endpointSelector": WEB, "egress": [
        {"toPorts": [{"ports": DNS_PORTS, "rules": {"dns": [{"matchPattern": "*.World.test."}]}}]},
        {"toPorts": [{"ports": DNS_PORTS[:1], "rules": {"dns": [{"matchName": "api.example.test"}]}}]},
    ]}))
    entries = {(e.protocol, e.port_low): e for e in web_egress(resolve_cluster(state)).entries}
    udp, tcp = entries[(Protocol.UDP, 53)], entries[(Protocol.TCP, 53)]
    assert (udp.l7_redirect, udp.l7_parser, tcp.l7_parser) == (True, "dns", "dns")
    assert set(udp.dns) == {DNSRule(match_pattern="*.world.test"), DNSRule(match_name="api.example.test")}
    assert tcp.dns == (DNSRule(match_pattern="*.world.test"),)
    assert len(udp.rules) == 2  # both items are named for flows


def test_plain_allow_on_the_same_port_wins_no_dns_filtering() -> None:
    state = state_of(cnp({"endpointSelector": WEB, "egress": [
        {"toPorts": [{"ports": DNS_PORTS[:1], "rules": {"dns": [{"matchName": "a.test"}]}}]},
        {"toPorts": [{"ports": DNS_PORTS[:1]}]}]}))
    udp = next(e for e in web_egress(resolve_cluster(state)).entries if e.port_low == 53)
    assert (udp.l7_redirect, udp.l7_parser, udp.dns) == (False, None, ())


def test_to_fqdns_selectors_get_stable_identities_in_every_intent() -> None:
    body = cnp({"endpointSelector": WEB, "egress": [
        {"toFQDNs": [{"matchName": "API.world.test"}, {"matchPattern": "*.world.test"}],
         "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]})
    resolver = Resolver()
    intents = resolver.update(state_of(body)).intents
    selectors = dict(intents["n1"].fqdn_selectors)
    assert selectors == dict(intents["n2"].fqdn_selectors)
    assert set(selectors.values()) == {DNSRule(match_name="api.world.test"), DNSRule(match_pattern="*.world.test")}
    assert all(number >= FIRST_FQDN_SELECTOR_IDENTITY for number in selectors)
    entries = [e for e in web_egress(intents).entries if e.identity in selectors]
    assert {(e.identity, e.protocol, e.port_low, e.verdict) for e in entries} == {
        (n, Protocol.TCP, 443, Verdict.ALLOW) for n in selectors}
    # no address owns a selector identity in the operator's ipcache; they are labelled for flows
    assert not [e for e in intents["n1"].ipcache if e.identity in selectors]
    assert intents["n1"].identity_labels[min(selectors)][0].startswith("fqdn:")
    # another policy adding a selector keeps the numbers already handed out
    other = cnp({"endpointSelector": WEB, "egress": [{"toFQDNs": [{"matchName": "b.test"}]}]}, name="q")
    again = resolver.update(state_of(body, other)).intents["n1"].fqdn_selectors
    assert {k: v for k, v in again.items() if k in selectors} == selectors and len(again) == 3
    # removing the policies removes the selectors
    assert not resolver.update(state_of()).intents["n1"].fqdn_selectors


def test_fqdn_item_without_answers_allows_nothing_but_enforces() -> None:
    state = state_of(cnp({"endpointSelector": WEB, "egress": [{"toFQDNs": [{"matchName": "a.test"}]}]}))
    egress = web_egress(resolve_cluster(state))
    assert egress.enforced and all(e.identity >= FIRST_FQDN_SELECTOR_IDENTITY for e in egress.entries)
