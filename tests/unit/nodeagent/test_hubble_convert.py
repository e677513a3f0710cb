"""Ciliary flow events as Hubble flow.Flow messages (hubble_convert) and the GetFlows query (hubble_query)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import pytest
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2

from ciliary.hubbleapi import flow_pb2, observer_pb2
from ciliary.nodeagent import flowapi, hubble_convert, hubble_filter, hubble_query, planning
from ciliary.nodeagent.datapath import flows, maps
from ciliary.operator import intents

ALLOW = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", rule_index=0,
                        section="ingress[0]")
DENY = intents.RuleRef(kind="CiliumClusterwideNetworkPolicy", name="no-xwing", uid="u2", rule_index=0,
                       section="ingressDeny[0]")
INTENT = intents.NodeIntent(
    node="n1", revision=7,
    endpoints=(intents.EndpointIntent(namespace="default", pod="deathstar", ipv4="10.0.0.2", identity=300),),
    identity_labels={300: ("k8s:org=empire", "k8s:class=deathstar", "k8s:io.kubernetes.pod.namespace=default"),
                     301: ("k8s:org=alliance", "k8s:io.kubernetes.pod.namespace=default")},
)
INDEX = flowapi.IntentIndex.of("n1", INTENT)


def event(verdict: str = "dropped", reason: maps.Reason = maps.Reason.DROP_POLICY, *, sport: int = 40000,
          dport: int = 80, cookie: int = 0, protocol: int = 6, direction: str = "ingress", is_reply: bool = False,
          t: float = 1700000000.5, flags: int = 0x02, established: bool = False, match: int = 0) -> flows.FlowEvent:
    return flows.FlowEvent(time=t, src=IPv4Address("10.0.1.5"), dst=IPv4Address("10.0.0.2"),
                           sport=sport, dport=dport, protocol=protocol, tcp_flags=flags, verdict=verdict,
                           reason=reason, direction=direction, is_reply=is_reply, ep_id=1, src_identity=301,
                           dst_identity=300, cookie=cookie, ifindex=7, length=60, established=established,
                           match_type=match)


def test_the_policy_match_type_is_the_datapaths() -> None:
    """Hubble's numbers (1 L3-Only, 2 L3-L4, 3 L4-Only, 4 all, 5 L3-Proto, 6 Proto-Only); unset when none decided."""
    assert hubble_convert.to_flow(event(), INDEX, ()).policy_match_type == 0
    allowed = hubble_convert.to_flow(event("forwarded", maps.Reason.OK_POLICY, match=2), INDEX, ())
    assert allowed.policy_match_type == 2
    as_json = json_format.MessageToDict(allowed, preserving_proto_field_name=True)
    assert as_json["policy_match_type"] == 2
    assert hubble_convert.MATCH_TYPES == {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all",
                                          5: "l3-proto", 6: "proto-only"}


def test_dropped_flow_carries_hubble_fields() -> None:
    flow = hubble_convert.to_flow(event(), INDEX, ())
    assert flow.verdict == flow_pb2.DROPPED and flow.drop_reason_desc == flow_pb2.POLICY_DENIED
    assert flow.drop_reason == 133 and (flow.event_type.type, flow.event_type.sub_type) == (1, 133)
    assert flow.traffic_direction == flow_pb2.INGRESS and flow.HasField("is_reply") and not flow.is_reply.value
    assert flow.node_name == "n1" and flow.Type == flow_pb2.L3_L4
    assert (flow.IP.source, flow.IP.destination, flow.IP.ipVersion) == ("10.0.1.5", "10.0.0.2", flow_pb2.IPv4)
    assert flow.destination.pod_name == "deathstar" and flow.destination.namespace == "default"
    assert flow.destination.identity == 300 and "k8s:class=deathstar" in flow.destination.labels
    assert flow.source.pod_name == "" and flow.source.namespace == "default" and flow.source.identity == 301
    assert flow.l4.TCP.destination_port == 80 and flow.l4.TCP.flags.SYN and not flow.l4.TCP.flags.ACK
    assert flow.Summary == "TCP Flags: SYN"
    assert flow.time.seconds == 1700000000 and flow.time.nanos == 500_000_000
    # a default-deny drop names no policy
    assert not flow.ingress_denied_by and not flow.ingress_allowed_by
    # the JSON a hubble client prints uses the enum names
    as_json = json_format.MessageToDict(flow, preserving_proto_field_name=True)
    assert as_json["verdict"] == "DROPPED" and as_json["drop_reason_desc"] == "POLICY_DENIED"


def test_policy_names_go_to_allowed_or_denied_by_direction() -> None:
    allowed = hubble_convert.to_flow(event("forwarded", maps.Reason.OK_POLICY, cookie=1), INDEX, (ALLOW,), 7)
    assert [p.name for p in allowed.ingress_allowed_by] == ["rule1"] and not allowed.egress_allowed_by
    assert allowed.ingress_allowed_by[0].namespace == "default" and allowed.ingress_allowed_by[0].revision == 7
    assert allowed.ingress_allowed_by[0].kind == "CiliumNetworkPolicy"
    assert allowed.event_type.type == 4 and allowed.event_type.sub_type == 0
    assert allowed.trace_observation_point == flow_pb2.TO_ENDPOINT
    denied = hubble_convert.to_flow(event(reason=maps.Reason.DROP_POLICY_DENY, direction="egress", cookie=1),
                                    INDEX, (DENY,))
    assert [p.name for p in denied.egress_denied_by] == ["no-xwing"] and denied.drop_reason_desc == flow_pb2.POLICY_DENY
    egress = hubble_convert.to_flow(event("forwarded", maps.Reason.OK_POLICY, direction="egress"), INDEX, ())
    assert egress.event_type.sub_type == 5 and egress.trace_observation_point == flow_pb2.FROM_ENDPOINT


def test_other_protocols_and_reasons() -> None:
    udp = hubble_convert.to_flow(event(protocol=17, dport=53), INDEX, ())
    assert udp.l4.WhichOneof("protocol") == "UDP" and udp.l4.UDP.destination_port == 53
    icmp = hubble_convert.to_flow(event(protocol=1, sport=8), INDEX, ())
    assert icmp.l4.ICMPv4.type == 8 and icmp.Summary == "ICMPv4 EchoRequest"
    for reason, code in [(maps.Reason.DROP_SPOOFED_SOURCE, flow_pb2.INVALID_SOURCE_IP),
                         (maps.Reason.DROP_FRAGMENT, flow_pb2.IP_FRAGMENTATION_NOT_SUPPORTED),
                         (maps.Reason.DROP_UNSUPPORTED_L3, flow_pb2.UNSUPPORTED_L3_PROTOCOL)]:
        assert hubble_convert.to_flow(event(reason=reason), INDEX, ()).drop_reason_desc == code
    assert set(hubble_convert.DROP_CODES) == {r.name for r in maps.Reason if r.name.startswith("DROP_")}


def entries(events: list[flows.FlowEvent]) -> list[flowapi.RingEntry]:
    return [flowapi.RingEntry(e, INDEX, lambda _c: ()) for e in events]


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    return hubble_convert.timestamp(seconds)


def test_query_number_first_since_until_and_mask() -> None:
    ring = entries([event(sport=40000 + n, t=1700000000 + n) for n in range(10)])
    last3 = hubble_query.plan(observer_pb2.GetFlowsRequest(number=3)).history(ring)
    assert [f.l4.TCP.source_port for f in last3] == [40007, 40008, 40009]
    first2 = hubble_query.plan(observer_pb2.GetFlowsRequest(number=2, first=True)).history(ring)
    assert [f.l4.TCP.source_port for f in first2] == [40000, 40001]
    window = hubble_query.plan(observer_pb2.GetFlowsRequest(since=ts(1700000004), until=ts(1700000006)))
    assert [f.l4.TCP.source_port for f in window.history(ring)] == [40004, 40005, 40006]
    assert window.past_until(hubble_query.flow_of(ring[9])) and not window.past_until(hubble_query.flow_of(ring[5]))
    assert len(hubble_query.plan(observer_pb2.GetFlowsRequest()).history(ring)) == 10
    assert hubble_query.plan(observer_pb2.GetFlowsRequest(follow=True)).history(ring) == []
    masked = hubble_query.plan(observer_pb2.GetFlowsRequest(
        number=1, field_mask=field_mask_pb2.FieldMask(paths=["verdict", "source.pod_name"])))
    shaped = masked.shape(masked.history(ring)[0])
    assert shaped.verdict == flow_pb2.DROPPED and not shaped.HasField("IP") and not shaped.HasField("destination")
    # the conversion is cached on the ring entry
    assert hubble_query.flow_of(ring[0]) is hubble_query.flow_of(ring[0])


def test_query_refuses_bad_masks_and_time_windows() -> None:
    with pytest.raises(hubble_filter.FilterError, match="field_mask"):
        hubble_query.plan(observer_pb2.GetFlowsRequest(field_mask=field_mask_pb2.FieldMask(paths=["nope"])))
    with pytest.raises(hubble_filter.FilterError, match="field_mask"):
        hubble_query.plan(observer_pb2.GetFlowsRequest(field_mask=field_mask_pb2.FieldMask(paths=["source.nope"])))
    # published fields Ciliary's schema leaves out (the compact output of hubble asks for them) select
    # nothing; declared ones (l7: HTTP flows) are kept
    query = hubble_query.plan(observer_pb2.GetFlowsRequest(
        field_mask=field_mask_pb2.FieldMask(paths=["ethernet", "l7.dns.query", "verdict"])))
    assert query.mask is not None and list(query.mask.paths) == ["l7.dns.query", "verdict"]
    with pytest.raises(hubble_filter.FilterError, match="before since"):
        hubble_query.plan(observer_pb2.GetFlowsRequest(since=ts(10), until=ts(5)))


def test_rule_cookie_lookup_feeds_policy_names() -> None:
    cookie = planning.rule_cookie([ALLOW])
    entry = flowapi.RingEntry(event("forwarded", maps.Reason.OK_POLICY, cookie=cookie), INDEX,
                              {cookie: (ALLOW,)}.get)  # type: ignore[arg-type]
    assert [p.name for p in hubble_query.flow_of(entry).ingress_allowed_by] == ["rule1"]


def test_dns_exchange_becomes_flow_l7_dns() -> None:
    from ciliary.nodeagent.dns_proxy import L7FlowEvent

    def dns_event(verdict: str, reason: str, rcode: str, ips: list[str]) -> L7FlowEvent:
        return L7FlowEvent(time=1700000000.5, src=IPv4Address("10.0.0.2"), dst=IPv4Address("192.0.2.53"),
                           sport=5555, dport=53, protocol=17, verdict=verdict, reason=reason, src_identity=300,
                           dst_identity=2, cookie=0, l7={"type": "dns", "query": "api.world.test", "qtype": "A",
                                                          "rcode": rcode, "ips": ips, "ttl": 30, "latency_ms": 1.5})

    ok = hubble_convert.to_flow(dns_event("forwarded", "DNS_ALLOWED", "NOERROR", ["192.0.2.100"]), INDEX, (ALLOW,))
    assert ok.Type == flow_pb2.L7 and ok.verdict == flow_pb2.FORWARDED and ok.event_type.type == 129
    assert (ok.l7.dns.query, list(ok.l7.dns.ips), ok.l7.dns.ttl, ok.l7.dns.rcode) == (
        "api.world.test.", ["192.0.2.100"], 30, 0)
    assert ok.l7.type == flow_pb2.RESPONSE and ok.l7.latency_ns == 1_500_000 and list(ok.l7.dns.qtypes) == ["A"]
    refused = hubble_convert.to_flow(dns_event("dropped", "DNS_REFUSED", "REFUSED", []), INDEX, ())
    assert refused.verdict == flow_pb2.DROPPED and refused.l7.dns.rcode == 5 and not refused.l7.dns.ips
    # the flow API carries the same record
    assert flowapi.enrich(dns_event("dropped", "DNS_REFUSED", "REFUSED", []), INDEX, lambda _c: ())["l7"][
        "rcode"] == "REFUSED"


@pytest.mark.parametrize("node", ["n1", "", "a-much-longer-node-name-" * 8])
def test_response_bytes_are_the_serialized_response(node: str) -> None:
    """The hand-framed GetFlowsResponse is byte for byte what protobuf serializes (and parses back equal),
    for an empty node name, a multi-byte length prefix, a flow without a time and a DNS flow with many IPs."""
    untimed = flow_pb2.Flow(verdict=flow_pb2.FORWARDED)
    big = hubble_convert.to_flow(event(reason=maps.Reason.DROP_POLICY_DENY, cookie=1), INDEX, (DENY,) * 200)
    for flow in (hubble_convert.to_flow(event(), INDEX, ()), untimed, big):
        expected = observer_pb2.GetFlowsResponse(flow=flow, node_name=node, time=flow.time if flow.HasField("time")
                                                 else None)
        wire = hubble_query.response_bytes(flow, node)
        assert wire == expected.SerializeToString()
        assert observer_pb2.GetFlowsResponse.FromString(wire) == expected
    assert len(big.SerializeToString()) > 16384  # a 3-byte length prefix was exercised


SVC_INDEX = flowapi.IntentIndex.of(
    "n1", INTENT, lambda address, port, l4: {("10.96.0.10", 80, 6): "default/deathstar"}.get((address, port, l4), ""))


def through(frontend: tuple[str, int] | None, **kw: object) -> flows.FlowEvent:
    return dataclasses.replace(event("forwarded", maps.Reason.OK_POLICY, direction="egress", **kw),  # type: ignore[arg-type]
                               frontend=frontend)


def test_a_connection_opened_through_a_frontend_names_its_service() -> None:
    """The forward packets name it as the destination Service, the replies as the source Service; no frontend, a
    frontend no Service has (deleted since), another protocol on its port or no lookup: no Service."""
    flow = hubble_convert.to_flow(through(("10.96.0.10", 80)), SVC_INDEX, ())
    assert (flow.destination_service.namespace, flow.destination_service.name) == ("default", "deathstar")
    assert not flow.HasField("source_service")
    reply = hubble_convert.to_flow(through(("10.96.0.10", 80), is_reply=True), SVC_INDEX, ())
    assert (reply.source_service.namespace, reply.source_service.name) == ("default", "deathstar")
    assert not reply.HasField("destination_service")
    for plain in (through(None), through(("10.96.0.11", 80)), through(("10.96.0.10", 80), protocol=17)):
        flow = hubble_convert.to_flow(plain, SVC_INDEX, ())
        assert not flow.HasField("destination_service") and not flow.HasField("source_service")
    assert not hubble_convert.to_flow(through(("10.96.0.10", 80)), INDEX, ()).HasField("destination_service")
    as_json = json_format.MessageToDict(hubble_convert.to_flow(through(("10.96.0.10", 80)), SVC_INDEX, ()),
                                        preserving_proto_field_name=True)
    assert as_json["destination_service"] == {"name": "deathstar", "namespace": "default"}


def test_service_filters_select_by_namespace_and_name_prefix() -> None:
    flow = hubble_convert.to_flow(through(("10.96.0.10", 80)), SVC_INDEX, ())
    plain = hubble_convert.to_flow(through(None), SVC_INDEX, ())
    for values, selected in ((["default/deathstar"], True), (["default/death"], True), (["default/"], True),
                             (["deathstar"], True), (["other/deathstar"], False), (["default/xwing"], False)):
        to = hubble_filter.compile_filters([flow_pb2.FlowFilter(destination_service=values)], [])
        assert to(flow) is selected, values
        assert not to(plain)
        assert not hubble_filter.compile_filters([flow_pb2.FlowFilter(source_service=values)], [])(flow)


def test_the_flow_api_names_the_service_and_frontend() -> None:
    out = flowapi.enrich(through(("10.96.0.10", 80)), SVC_INDEX, lambda _c: ())
    assert (out["service"], out["frontend"]) == ("default/deathstar", "10.96.0.10:80")
    assert "service" not in flowapi.enrich(through(None), SVC_INDEX, lambda _c: ())
    assert flowapi.enrich(through(("10.96.0.99", 80)), SVC_INDEX, lambda _c: ())["service"] == ""


def test_the_hub_keeps_the_service_lookup_across_intents() -> None:
    hub = flowapi.FlowHub("n1")
    hub.set_service_lookup(SVC_INDEX.service_of)
    hub.set_intent(INTENT)
    assert hub.index.service_of("10.96.0.10", 80, 6) == "default/deathstar" and hub.index.revision == 7
    hub.set_intent(None)
    assert hub.index.service_of("10.96.0.10", 80, 6) == "default/deathstar"
