"""The kube-proxy bench's pure parts: sizes, the objects both proxies read, ratios and the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import kpr_objects as ko


def test_sizes_are_sorted_unique_and_bounded() -> None:
    assert ko.parse_sizes("10000,1000,5000,1000") == (1000, 5000, 10000)
    for bad in ("", "a,b", "0", f"{ko.BULK_MAX + 1}"):
        with pytest.raises(ko.SizeError):
            ko.parse_sizes(bad)


def test_bulk_addresses_are_distinct_and_stay_in_their_range() -> None:
    ips = {ko.bulk_ip(i) for i in range(ko.BULK_MAX)}
    assert len(ips) == ko.BULK_MAX
    assert ko.bulk_ip(0) == "10.96.64.0" and ko.bulk_ip(ko.BULK_MAX - 1) == "10.96.255.254"
    assert ko.RATE_IP not in ips and ko.filler_ip(8) not in ips
    with pytest.raises(IndexError):
        ko.bulk_ip(ko.BULK_MAX)


def test_the_rate_and_filler_services_sit_in_the_band_the_apiserver_keeps_for_named_cluster_ips() -> None:
    import ipaddress
    band = ipaddress.IPv4Network("10.96.0.0/24")
    assert all(ipaddress.IPv4Address(ip) in band for ip in (ko.RATE_IP, ko.filler_ip(0), ko.filler_ip(8)))
    assert {"10.96.0.1", "10.96.0.10"}.isdisjoint({ko.RATE_IP, *(ko.filler_ip(i) for i in range(9))})


def test_a_bulk_window_skips_every_address_a_service_already_holds() -> None:
    assert ko.free_window(set(), 50) == 0
    assert ko.free_window({"10.96.0.10", "None", "", "10.96.38.30"}, 50) == 0  # outside the bulk range
    assert ko.free_window({"10.96.64.20"}, 50) == 21
    assert ko.free_window({"10.96.64.20"}, 20) == 0
    assert ko.free_window({"10.96.64.20", "10.96.64.60", "10.96.64.3"}, 30) == 21
    assert ko.free_window({"10.96.64.20", "10.96.64.40", "10.96.64.3"}, 30) == 41
    first = ko.free_window({"10.96.64.0", "10.96.64.5"}, 5)
    assert first == 6 and {ko.bulk_ip(i) for i in range(first, first + 5)}.isdisjoint({"10.96.64.0", "10.96.64.5"})
    with pytest.raises(ko.SizeError):
        ko.free_window({"10.96.127.255"}, ko.BULK_MAX)
    pairs = ko.bulk_objects(2, "kpb", [("10.244.2.2", "node-2")], 8080, first=21)
    assert [svc["metadata"]["name"] for svc, _ in pairs] == ["svc-21", "svc-22"]
    assert [svc["spec"]["clusterIP"] for svc, _ in pairs] == ["10.96.64.21", "10.96.64.22"]


def test_each_service_gets_one_slice_with_every_backend_on_the_named_port() -> None:
    backends = [("10.244.2.2", "node-2"), ("10.244.2.3", "node-2"), ("10.244.2.4", "node-2")]
    pairs = ko.bulk_objects(3, "kpb", backends, 8080)
    assert [svc["spec"]["clusterIP"] for svc, _ in pairs] == ["10.96.64.0", "10.96.64.1", "10.96.64.2"]
    for svc, eps in pairs:
        assert "selector" not in svc["spec"] and svc["spec"]["type"] == "ClusterIP"
        assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
        assert [e["addresses"] for e in eps["endpoints"]] == [["10.244.2.2"], ["10.244.2.3"], ["10.244.2.4"]]
        assert all(e["conditions"]["ready"] for e in eps["endpoints"])
        assert eps["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
        assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 80
    node_port = ko.service("rate", "kpb", ko.RATE_IP, 9000, node_port=30900)["spec"]
    assert node_port["type"] == "NodePort" and node_port["ports"][0]["nodePort"] == 30900


def test_ratio_is_how_many_times_better_ciliary_is() -> None:
    fast, slow = ko.Figure(2.0, 30), ko.Figure(50.0, 30)
    assert ko.ratio(fast, slow, lower_is_better=True) == 25.0  # times: peer / ours
    assert ko.ratio(slow, fast, lower_is_better=False) == 25.0  # rates: ours / peer
    assert ko.ratio(ko.Figure(None, 30, "timeout"), slow, lower_is_better=True) is None


def test_table_shows_failures_with_their_reason_and_no_ratio() -> None:
    rows = [("program 10,000", " s", True, {"ciliary": ko.Figure(None, 41, "9000 of 10000 answered"),
                                             "iptables": ko.Figure(123.4, 52)}),
            ("CRR", "/s", False, {"ciliary": ko.Figure(3000, 41), "iptables": ko.Figure(1000, 52)})]
    lines = ko.table(rows, ["iptables"]).splitlines()
    assert lines[0].split() == ["what", "ciliary", "iptables", "vs", "iptables"]
    assert "failed (9000 of 10000 answered)" in lines[1] and "123 s (load 52)" in lines[1]
    assert lines[1].rstrip().endswith("-")
    assert "3,000/s (load 41)" in lines[2] and lines[2].rstrip().endswith("3.00x")
