"""The first pass of a GetFlows whitelist over raw events (hubble_prefilter): it must never reject an event
whose flow the full filter accepts (property-tested over generated events and filters, index with local
pods, remote peers and a pod without a namespace), and it does reject what it can; GetFlows answers are
unchanged by it (the query with and without the first pass, over one ring)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.hubbleapi import flow_pb2, observer_pb2
from ciliary.nodeagent import flowapi, hubble_convert, hubble_filter, hubble_prefilter, hubble_query
from ciliary.nodeagent.datapath import flows, maps
from ciliary.operator import intents

F = flow_pb2.FlowFilter
INTENT = intents.NodeIntent(
    node="n1", revision=3,
    endpoints=(intents.EndpointIntent(namespace="default", pod="deathstar", ipv4="10.0.0.2", identity=300),
               intents.EndpointIntent(namespace="default", pod="deathstar-2", ipv4="10.0.0.3", identity=300),
               intents.EndpointIntent(namespace="empire", pod="tiefighter", ipv4="10.0.0.4", identity=302)),
    identity_labels={300: ("k8s:class=deathstar", "k8s:io.kubernetes.pod.namespace=default"),
                     301: ("k8s:org=alliance", "k8s:io.kubernetes.pod.namespace=default"),
                     302: ("k8s:org=empire", "k8s:io.kubernetes.pod.namespace=empire")})
INDEX = flowapi.IntentIndex.of("n1", INTENT)
# a local pod whose namespace the index does not know (the flow's namespace then comes from labels)
ODD = flowapi.IntentIndex("n1", {**INDEX.pods, "10.0.0.9": ("", "ghost")}, INDEX.labels)
IPS = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.5", "10.0.0.9"]

events = st.builds(
    flows.FlowEvent, time=st.just(1700000000.0), src=st.sampled_from(IPS).map(IPv4Address),
    dst=st.sampled_from(IPS).map(IPv4Address), sport=st.sampled_from([0, 53, 80, 40000]),
    dport=st.sampled_from([0, 53, 80, 443]), protocol=st.sampled_from([1, 6, 17, 58, 132]),
    tcp_flags=st.sampled_from([0, 2, 18]), verdict=st.sampled_from(["dropped", "forwarded", "DROPPED"]),
    reason=st.sampled_from([maps.Reason.DROP_POLICY, maps.Reason.OK_POLICY]),
    direction=st.sampled_from(["ingress", "egress"]), is_reply=st.booleans(), ep_id=st.just(1),
    src_identity=st.sampled_from([300, 301, 302, 2]), dst_identity=st.sampled_from([300, 301, 302, 2]),
    cookie=st.just(0), ifindex=st.just(7), length=st.just(60))

pods = st.lists(st.sampled_from(["default/deathstar", "default/death", "default/", "empire/tie", "deathstar",
                                 "other/deathstar", "ghost", "/ghost"]), min_size=1, max_size=2)
filters = st.builds(
    lambda verdict, direction, proto, sid, did, sport, dport, spod, dpod, label: F(
        verdict=verdict, traffic_direction=direction, protocol=proto, source_identity=sid,
        destination_identity=did, source_port=sport, destination_port=dport, source_pod=spod,
        destination_pod=dpod, destination_label=label),
    st.lists(st.sampled_from([flow_pb2.DROPPED, flow_pb2.FORWARDED]), max_size=2),
    st.lists(st.sampled_from([flow_pb2.INGRESS, flow_pb2.EGRESS]), max_size=1),
    st.lists(st.sampled_from(["TCP", "udp", "icmp", "ICMPv6", "sctp", "http"]), max_size=2),
    st.lists(st.sampled_from([300, 301, 2]), max_size=2), st.lists(st.sampled_from([300, 302]), max_size=1),
    st.lists(st.sampled_from(["80", "40000"]), max_size=1), st.lists(st.sampled_from(["80", "443", "53"]), max_size=1),
    st.one_of(st.just([]), pods), st.one_of(st.just([]), pods),
    st.lists(st.sampled_from(["class=deathstar", "org=empire"]), max_size=1))


@settings(max_examples=600)
@given(events, st.lists(filters, min_size=1, max_size=3), st.sampled_from([INDEX, ODD]))
def test_never_rejects_what_the_full_filter_accepts(event: flows.FlowEvent, whitelist: list[F],
                                                   index: flowapi.IntentIndex) -> None:
    full = hubble_filter.compile_filters(whitelist, [])
    first = hubble_prefilter.compile_prefilter(whitelist)
    flow = hubble_convert.to_flow(event, index, ())
    if full(flow):
        assert first is None or first(event, index), (whitelist, event)


pod_filters = st.builds(lambda verdict, spod, dpod: F(verdict=verdict, source_pod=spod, destination_pod=dpod),
                        st.lists(st.sampled_from([flow_pb2.DROPPED, flow_pb2.FORWARDED]), max_size=1),
                        st.one_of(st.just([]), pods), st.one_of(st.just([]), pods))


@settings(max_examples=400)
@given(events, st.lists(pod_filters, min_size=1, max_size=2), st.sampled_from([INDEX, ODD]))
def test_never_rejects_a_pod_the_full_filter_accepts(event: flows.FlowEvent, whitelist: list[F],
                                                    index: flowapi.IntentIndex) -> None:
    """The same property where most generated cases pass the full filter (pods and verdicts only)."""
    test_never_rejects_what_the_full_filter_accepts.hypothesis.inner_test(event, whitelist, index)  # type: ignore[attr-defined]


def ev(**kw: object) -> flows.FlowEvent:
    base: dict[str, object] = dict(time=1700000000.0, src=IPv4Address("10.0.1.5"), dst=IPv4Address("10.0.0.2"),
                                   sport=40000, dport=80, protocol=6, tcp_flags=2, verdict="dropped",
                                   reason=maps.Reason.DROP_POLICY, direction="ingress", is_reply=False, ep_id=1,
                                   src_identity=301, dst_identity=300, cookie=0, ifindex=7, length=60)
    base.update(kw)
    return flows.FlowEvent(**base)  # type: ignore[arg-type]


def test_it_rejects_what_it_can_and_steps_aside_otherwise() -> None:
    hubble_pod = [F(source_pod=["default/deathstar"], verdict=[flow_pb2.DROPPED]),
                  F(destination_pod=["default/deathstar"], verdict=[flow_pb2.DROPPED])]
    first = hubble_prefilter.compile_prefilter(hubble_pod)
    assert first is not None
    assert first(ev(), INDEX)
    assert not first(ev(verdict="forwarded"), INDEX)
    assert not first(ev(dst=IPv4Address("10.0.0.4")), INDEX)  # tiefighter, not deathstar
    assert not first(ev(src=IPv4Address("10.0.1.6"), dst=IPv4Address("10.0.1.7")), INDEX)  # no local pod
    assert not hubble_prefilter.compile_prefilter([F(destination_port=["443"])])(ev(), INDEX)  # type: ignore[misc]
    assert not hubble_prefilter.compile_prefilter([F(protocol=["udp"])])(ev(), INDEX)  # type: ignore[misc]
    # a filter it cannot narrow (labels only), a namespace-only pod filter, or no whitelist: no first pass
    assert hubble_prefilter.compile_prefilter([F(verdict=[flow_pb2.DROPPED]), F(source_label=["org"])]) is None
    assert hubble_prefilter.compile_prefilter([F(source_pod=["default/"])]) is None
    assert hubble_prefilter.compile_prefilter([]) is None


def ring_entries(n: int) -> list[flowapi.RingEntry]:
    out = []
    for i in range(n):
        event = ev(src=IPv4Address(IPS[i % 5]), dst=IPv4Address(IPS[(i * 7) % 5]),
                   verdict="dropped" if i % 3 == 0 else "forwarded", direction="egress" if i % 2 else "ingress",
                   dport=(80, 443, 53)[i % 3], protocol=(6, 17)[i % 2], src_identity=(300, 301, 302)[i % 3],
                   time=1700000000.0 + i)
        out.append(flowapi.RingEntry(event, INDEX, lambda _cookie: ()))
    return out


def test_get_flows_answers_are_the_same_with_and_without_it() -> None:
    requests = [
        observer_pb2.GetFlowsRequest(whitelist=[F(source_pod=["default/deathstar"], verdict=[flow_pb2.DROPPED]),
                                                F(destination_pod=["default/deathstar"], verdict=[flow_pb2.DROPPED])]),
        observer_pb2.GetFlowsRequest(number=5, whitelist=[F(destination_port=["80"], protocol=["tcp"])]),
        observer_pb2.GetFlowsRequest(number=3, first=True, whitelist=[F(traffic_direction=[flow_pb2.EGRESS])],
                                     blacklist=[F(source_identity=[301])]),
        observer_pb2.GetFlowsRequest(whitelist=[F(destination_pod=["empire/"])]),
    ]
    entries = ring_entries(300)
    for request in requests:
        query = hubble_query.plan(request)
        with_first = query.history(entries)
        query.prefilter = None
        without = query.history(entries)
        assert [f.SerializeToString() for f in with_first] == [f.SerializeToString() for f in without]
        assert with_first, request


SERVICES = {("10.96.0.10", 80, 6): "default/deathstar", ("10.96.0.11", 53, 17): "kube-system/kube-dns"}
SVC_INDEX = flowapi.IntentIndex.of("n1", INTENT, lambda a, p, l4: SERVICES.get((a, p, l4), ""))
service_events = st.tuples(events, st.sampled_from([None, ("10.96.0.10", 80), ("10.96.0.11", 53),
                                                    ("10.96.0.12", 80)])).map(
    lambda pair: dataclasses.replace(pair[0], frontend=pair[1]))
services = st.lists(st.sampled_from(["default/deathstar", "default/death", "default/", "kube-system/", "deathstar",
                                     "other/deathstar", "kube-system/kube-dns"]), min_size=1, max_size=2)
service_filters = st.builds(
    lambda verdict, ssvc, dsvc, dport: F(verdict=verdict, source_service=ssvc, destination_service=dsvc,
                                         destination_port=dport),
    st.lists(st.sampled_from([flow_pb2.DROPPED, flow_pb2.FORWARDED]), max_size=1),
    st.one_of(st.just([]), services), st.one_of(st.just([]), services),
    st.lists(st.sampled_from(["80", "53"]), max_size=1))


@settings(max_examples=600)
@given(service_events, st.lists(service_filters, min_size=1, max_size=2), st.sampled_from([SVC_INDEX, INDEX]))
def test_never_rejects_a_service_the_full_filter_accepts(event: flows.FlowEvent, whitelist: list[F],
                                                        index: flowapi.IntentIndex) -> None:
    """Service filters: the first pass asks only for a frontend on the event; events with and without one,
    frontends some Service has and one none has, indexes with and without the Service lookup."""
    test_never_rejects_what_the_full_filter_accepts.hypothesis.inner_test(event, whitelist, index)  # type: ignore[attr-defined]


def test_a_service_filter_rejects_events_without_a_frontend_first() -> None:
    first = hubble_prefilter.compile_prefilter([F(destination_service=["default/deathstar"])])
    assert first is not None
    assert not first(ev(), SVC_INDEX)
    assert first(dataclasses.replace(ev(), frontend=("10.96.0.10", 80)), SVC_INDEX)
