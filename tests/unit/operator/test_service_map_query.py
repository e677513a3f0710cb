"""The service map's URL parameters -> one GetFlows request (ciliary.operator.service_map_query): the
filters ``hubble observe`` sends for the same flags, judged by the agent's own filter engine."""

from __future__ import annotations

import pytest

from ciliary.hubbleapi import flow_pb2
from ciliary.nodeagent import hubble_filter
from ciliary.operator import service_map_query as q
from test_service_map import flow, star_wars


def matcher(query: q.MapQuery):  # type: ignore[no-untyped-def]
    request = query.request(now=1700000100)
    return hubble_filter.compile_filters(request.whitelist, request.blacklist)


def test_parse_query_accepts_the_documented_parameters_only() -> None:
    query = q.parse_query([("namespace", "default"), ("verdict", "dropped,FORWARDED"), ("window", "60"),
                           ("limit", "10"), ("label", "org=empire"), ("label", "class=xwing"), ("to-port", "80"),
                           ("pod", ""), ("protocol", "tcp")])
    assert (query.namespace, query.verdicts, query.window_s, query.limit) == ("default", ("DROPPED", "FORWARDED"),
                                                                              60, 10)
    assert query.criteria == (("label", ("org=empire", "class=xwing")), ("protocol", ("tcp",)), ("to-port", ("80",)))
    assert q.parse_query([]) == q.MapQuery()
    for pairs, parameter in (([("namespace", "Bad_NS")], "namespace"), ([("verdict", "AUDIT")], "verdict"),
                             ([("window", "0")], "window"), ([("window", "x")], "window"),
                             ([("limit", "999999")], "limit"), ([("podd", "x")], "podd"),
                             ([("identity", "abc")], "identity"), ([("window", "1"), ("window", "2")], "window"),
                             ([("pod", f"default/p{i}") for i in range(40)], "pod")):
        with pytest.raises(q.QueryError) as info:
            q.parse_query(pairs)
        assert info.value.parameter == parameter


def test_request_window_limit_and_no_follow() -> None:
    request = q.MapQuery(window_s=60, limit=100).request(now=1700000100.5)
    assert request.number == 100 and not request.follow and not request.whitelist
    assert (request.since.seconds, request.since.nanos) == (1700000040, 500_000_000)


def test_namespace_and_verdict_filter_as_hubble_observe() -> None:
    matches = matcher(q.MapQuery(namespace="default", verdicts=("DROPPED",)))
    flows = [r.flow for r in star_wars()]
    assert [f.verdict for f in flows if matches(f)] == [flow_pb2.DROPPED, flow_pb2.DROPPED]
    other = flow("xwing", "deathstar", at="ingress", verdict=flow_pb2.DROPPED)
    other.source.namespace = other.destination.namespace = "kube-system"
    assert not matches(other)


def test_either_end_criteria_stay_on_one_side_and_one_end_criteria_apply_to_both() -> None:
    # like `hubble observe --pod default/xwing --to-port 80`: xwing on either end, destination port 80
    query = q.parse_query([("pod", "default/xwing"), ("to-port", "80")])
    whitelist = query.whitelist()
    assert [list(f.source_pod) for f in whitelist] == [["default/xwing"], []]
    assert [list(f.destination_pod) for f in whitelist] == [[], ["default/xwing"]]
    assert all(list(f.destination_port) == ["80"] for f in whitelist)
    matches = matcher(query)
    assert matches(flow("xwing", "deathstar", at="egress"))
    assert not matches(flow("xwing", "deathstar", at="egress", dport=443))
    assert not matches(flow("tiefighter", "deathstar", at="egress"))
    # a pod in the map's namespace: the namespace qualifies it, it is not an alternative to it
    matches = matcher(q.parse_query([("namespace", "default"), ("pod", "tiefighter")]))
    assert matches(flow("tiefighter", "deathstar", at="egress"))
    assert not matches(flow("xwing", "deathstar", at="egress"))
    matches = matcher(q.parse_query([("namespace", "default"), ("from-pod", "default/xwing")]))
    assert matches(flow("xwing", "deathstar", at="egress"))
    assert not matches(flow("tiefighter", "deathstar", at="egress"))
    # one end only: from org=empire, to deathstar's identity, TCP, seen on node-1
    matches = matcher(q.parse_query([("from-label", "org=empire"), ("to-identity", "300"), ("protocol", "TCP"),
                                     ("node-name", "node-1")]))
    assert matches(flow("tiefighter", "deathstar", at="ingress"))
    assert not matches(flow("tiefighter", "deathstar", at="egress"))  # observed on node-2
    assert not matches(flow("xwing", "deathstar", at="ingress"))
    # label on either end: the deathstar's replies to the tiefighter are from org=empire too
    matches = matcher(q.parse_query([("label", "class=tiefighter")]))
    assert matches(flow("tiefighter", "deathstar", at="egress"))
    assert matches(flow("deathstar", "tiefighter", at="egress", reply=True))
    assert not matches(flow("xwing", "deathstar", at="egress"))


def test_a_value_the_server_cannot_use_is_refused_by_its_filter_engine() -> None:
    for pairs, field in (([("to-port", "eighty")], "destination_port"), ([("protocol", "tcpp")], "protocol"),
                         ([("label", "org=((")], "source_label")):
        with pytest.raises(hubble_filter.FilterError) as info:
            matcher(q.parse_query(pairs))
        assert field in str(info.value)
