"""Hubble FlowFilter semantics over Ciliary's flows (hubble_filter): whitelist/blacklist, every field kind,
and refusal (FilterError) of what cannot be evaluated."""

from __future__ import annotations

import pytest
from test_hubble_convert import INDEX, event

from ciliary.hubbleapi import flow_pb2
from ciliary.nodeagent import hubble_convert, hubble_filter
from ciliary.nodeagent.datapath import maps

F = flow_pb2.FlowFilter
DROP = hubble_convert.to_flow(event(), INDEX, ())  # 10.0.1.5:40000 (rebel, 301) -> deathstar 10.0.0.2:80, SYN
FWD = hubble_convert.to_flow(event("forwarded", maps.Reason.OK_POLICY, direction="egress", is_reply=True,
                                   flags=0x12), INDEX, ())


def passes(flow: flow_pb2.Flow, whitelist: list[flow_pb2.FlowFilter] = (),  # type: ignore[assignment]
           blacklist: list[flow_pb2.FlowFilter] = ()) -> bool:  # type: ignore[assignment]
    return hubble_filter.compile_filters(whitelist, blacklist)(flow)


def test_whitelist_is_or_blacklist_subtracts_fields_are_and() -> None:
    assert passes(DROP) and passes(FWD)
    pod = [F(source_pod=["default/deathstar"]), F(destination_pod=["default/deathstar"])]  # hubble --pod
    assert passes(DROP, pod)
    assert passes(DROP, [F(destination_pod=["default/death"])])  # a name prefix
    assert passes(DROP, [F(destination_pod=["default/"])])  # the whole namespace
    assert not passes(DROP, [F(source_pod=["default/deathstar"])])
    assert not passes(DROP, [F(destination_pod=["other/deathstar"])])
    assert passes(DROP, [F(verdict=[flow_pb2.DROPPED], destination_pod=["default/deathstar"])])
    assert not passes(DROP, [F(verdict=[flow_pb2.FORWARDED], destination_pod=["default/deathstar"])])
    assert passes(DROP, [F(verdict=[flow_pb2.FORWARDED, flow_pb2.DROPPED])])
    assert not passes(DROP, pod, [F(verdict=[flow_pb2.DROPPED])])
    assert passes(FWD, [], [F(verdict=[flow_pb2.DROPPED])])


def test_addresses_ports_protocols_identities() -> None:
    assert passes(DROP, [F(source_ip=["10.0.1.5"])]) and passes(DROP, [F(source_ip=["10.0.0.0/16"])])
    assert not passes(DROP, [F(destination_ip=["10.0.1.5"])])
    assert passes(DROP, [F(destination_port=["80"], source_port=["40000"])])
    assert not passes(DROP, [F(destination_port=["443"])])
    assert passes(DROP, [F(protocol=["TCP"])]) and not passes(DROP, [F(protocol=["udp"])])
    assert not passes(DROP, [F(protocol=["http"])])  # no L7 records
    assert passes(DROP, [F(source_identity=[301], destination_identity=[300])])
    assert not passes(DROP, [F(source_identity=[300])])


def test_labels_selectors() -> None:
    assert passes(DROP, [F(destination_label=["class=deathstar"])])
    assert passes(DROP, [F(destination_label=["k8s:class=deathstar,org in (empire, sith)"])])
    assert not passes(DROP, [F(destination_label=["org notin (empire)"])])
    assert passes(DROP, [F(source_label=["org!=empire"])]) and passes(DROP, [F(source_label=["!class"])])
    assert passes(DROP, [F(source_label=["org"])]) and not passes(DROP, [F(source_label=["reserved:org"])])
    with pytest.raises(hubble_filter.FilterError, match="source_label"):
        hubble_filter.compile_filter(F(source_label=["org=(("]))


def test_verdicts_reasons_directions_reply_types_flags_nodes() -> None:
    assert passes(DROP, [F(drop_reason_desc=[flow_pb2.POLICY_DENIED])])
    assert not passes(DROP, [F(drop_reason_desc=[flow_pb2.POLICY_DENY])])
    assert passes(DROP, [F(traffic_direction=[flow_pb2.INGRESS])]) and passes(FWD, [F(traffic_direction=[flow_pb2.EGRESS])])
    assert passes(FWD, [F(reply=[True])]) and not passes(DROP, [F(reply=[True])])
    drop_type = flow_pb2.EventTypeFilter(type=1)
    trace_from_ep = flow_pb2.EventTypeFilter(type=4, match_sub_type=True, sub_type=5)
    assert passes(DROP, [F(event_type=[drop_type])]) and not passes(FWD, [F(event_type=[drop_type])])
    assert passes(FWD, [F(event_type=[trace_from_ep])])
    assert passes(DROP, [F(tcp_flags=[flow_pb2.TCPFlags(SYN=True)])])
    assert not passes(DROP, [F(tcp_flags=[flow_pb2.TCPFlags(SYN=True, ACK=True)])])
    assert passes(FWD, [F(tcp_flags=[flow_pb2.TCPFlags(SYN=True, ACK=True)])])
    assert passes(DROP, [F(node_name=["n1"])]) and passes(DROP, [F(node_name=["n*"])])
    assert passes(DROP, [F(node_name=["default/n1"])]) and not passes(DROP, [F(node_name=["other/n1"])])
    assert passes(DROP, [F(ip_version=[flow_pb2.IPv4])]) and passes(DROP, [F(interface=[flow_pb2.NetworkInterface(index=7)])])


def test_data_ciliary_never_records_matches_nothing() -> None:
    for f in (F(source_fqdn=["*.example.com"]), F(destination_service=["default/x"]), F(http_status_code=["5+"]),
              F(dns_query=[".*"]), F(uuid=["x"]), F(source_workload=[flow_pb2.Workload(name="w")])):
        assert not passes(DROP, [f])
        assert passes(DROP, [], [f])


@pytest.mark.parametrize("bad", [
    F(source_ip=["10.0.0.300"]), F(destination_port=["http"]), F(destination_port=["70000"]),
    F(protocol=["tcpp"]), F(http_status_code=["abc"]), F(dns_query=["(unclosed"]),
    F(experimental=F.Experimental(cel_expression=["true"])),
])
def test_malformed_filters_are_refused_by_field(bad: flow_pb2.FlowFilter) -> None:
    with pytest.raises(hubble_filter.FilterError) as info:
        hubble_filter.compile_filters([bad], [])
    assert info.value.field in str(info.value)


def test_unknown_filter_fields_are_refused_not_ignored() -> None:
    raw = F(source_pod=["default/x"]).SerializeToString() + bytes([0xa8, 0x03, 0x01])  # field 53 (unknown)
    with pytest.raises(hubble_filter.FilterError, match="53"):
        hubble_filter.compile_filters([], [F.FromString(raw)])
