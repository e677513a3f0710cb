"""Semantic checks of ciliary.operator.api.validation, one finding at a time."""

from __future__ import annotations

from typing import Any

import pytest

from ciliary.operator.api import parse_policy
from ciliary.operator.api.validation import regex_problem, validate_policy


def _cnp(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": kind,
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    }


def _problems(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy") -> list[str]:
    return [str(p) for p in validate_policy(parse_policy(_cnp(spec, kind)))]


def _l7(
    rules: dict[str, Any], protocol: str = "TCP", port: str = "80", direction: str = "ingress"
) -> dict[str, Any]:
    return {
        "endpointSelector": {},
        direction: [{"toPorts": [{"ports": [{"port": port, "protocol": protocol}], "rules": rules}]}],
    }


def test_http_on_tcp_is_fine_and_dns_on_udp_egress_is_fine() -> None:
    assert _problems(_l7({"http": [{"path": "/v1/.*", "method": "GET|POST"}]})) == []
    assert _problems(_l7({"dns": [{"matchPattern": "*"}]}, "UDP", "53", "egress")) == []


@pytest.mark.parametrize("protocol", ["UDP", "SCTP", "ANY"])
def test_l7_other_than_dns_needs_tcp(protocol: str) -> None:
    assert _problems(_l7({"kafka": [{"topic": "t"}]}, protocol)) == [
        f"spec.ingress[0].toPorts[0].ports[0].protocol: kafka rules need protocol TCP, not {protocol}; "
        "only DNS rules work over other protocols"
    ]


def test_l7_without_protocol_counts_as_any() -> None:
    spec: dict[str, Any] = {
        "endpointSelector": {},
        "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}],
    }
    assert "not ANY" in _problems(spec)[0]


def test_l7_on_port_zero_and_without_ports() -> None:
    assert "cannot be used with port 0" in _problems(_l7({"http": [{}]}, port="0"))[0]
    spec: dict[str, Any] = {"endpointSelector": {}, "ingress": [{"toPorts": [{"rules": {"http": [{}]}}]}]}
    assert _problems(spec) == ["spec.ingress[0].toPorts[0].rules: L7 rules need at least one port in 'ports'"]


def test_dns_on_ingress_and_two_l7_kinds() -> None:
    assert _problems(_l7({"dns": [{"matchName": "a.b"}]}, "UDP", "53")) == [
        "spec.ingress[0].toPorts[0].rules.dns: DNS rules are only allowed in egress rules, not in ingress"
    ]
    found = _problems(_l7({"http": [{}], "l7proto": "x"}))
    assert "found http and l7proto" in found[0]


def test_l7_generic_needs_l7proto() -> None:
    assert "l7 rules need l7proto" in _problems(_l7({"l7": [{"a": "b"}]}))[0]


def test_header_matches_names_and_action_count_are_checked() -> None:
    acting = [{"name": f"x-{i}", "value": "v", "mismatch": "LOG"} for i in range(5)]
    (problem,) = _problems(_l7({"http": [{"headerMatches": acting}]}))
    assert problem.startswith("spec.ingress[0].toPorts[0].rules.http[0].headerMatches: at most 4")
    assert _problems(_l7({"http": [{"headerMatches": acting[:4] + [{"name": "x-5"}]}]})) == []
    for bad in (":path", "Host", "x token", "X-Envoy-Original-Dst-Host", "x-envoy-upstream-rq-timeout-ms"):
        (problem,) = _problems(_l7({"http": [{"headerMatches": [{"name": bad, "value": "v"}]}]}))
        assert problem.startswith("spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name:"), problem


@pytest.mark.parametrize("field", ["path", "method", "host"])
def test_http_regexes_are_checked(field: str) -> None:
    (problem,) = _problems(_l7({"http": [{field: "a(b"}]}))
    assert problem.startswith(
        f'spec.ingress[0].toPorts[0].rules.http[0].{field}: "a(b" is not a valid regular'
    )


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("/public/.*", True),
        ("GET|HEAD", True),
        ("^/make(\\?.*)?$", True),
        ("[+*]+", True),
        ("\\\\1", True),
        ("a(?=b)", False),
        ("(?<!x)y", False),
        ("(a)\\1", False),
        ("(?>a)", False),
        ("[a-", False),
    ],
)
def test_regex_problem(pattern: str, ok: bool) -> None:
    assert (regex_problem(pattern) is None) == ok


def test_fqdn_shapes_and_characters() -> None:
    spec: dict[str, Any] = {
        "endpointSelector": {},
        "egress": [
            {
                "toFQDNs": [
                    {},
                    {"matchName": "a.b", "matchPattern": "*.b"},
                    {"matchName": "a b"},
                    {"matchPattern": "*.b/c"},
                ]
            }
        ],
    }
    assert _problems(spec) == [
        "spec.egress[0].toFQDNs[0]: set exactly one of matchName or matchPattern",
        "spec.egress[0].toFQDNs[1]: set exactly one of matchName or matchPattern",
        'spec.egress[0].toFQDNs[2].matchName: "a b" contains characters not allowed in a DNS name '
        "(letters, digits, '-', '_' and '.')",
        'spec.egress[0].toFQDNs[3].matchPattern: "*.b/c" contains characters not allowed in a DNS pattern '
        "(letters, digits, '-', '_', '.' and '*')",
    ]


def test_cidrs() -> None:
    spec: dict[str, Any] = {
        "endpointSelector": {},
        "egress": [
            {"toCIDR": ["10.0.0.1", "fd00::/8", "nope"]},
            {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}]},
        ],
    }
    assert _problems(spec) == [
        'spec.egress[0].toCIDR[2]: "nope" is not a valid CIDR prefix',
        "spec.egress[1].toCIDRSet[0].except[0]: except fd00::/64 is not inside cidr 10.0.0.0/8",
    ]


def test_named_port_with_end_port() -> None:
    spec: dict[str, Any] = {
        "endpointSelector": {},
        "egressDeny": [{"toPorts": [{"ports": [{"port": "dns", "endPort": 60}]}]}],
    }
    assert _problems(spec) == [
        'spec.egressDeny[0].toPorts[0].ports[0].endPort: endPort needs a numeric port, but port is the name "dns"'
    ]


def test_node_selector_only_in_ccnp() -> None:
    spec: dict[str, Any] = {"nodeSelector": {"matchLabels": {"a": "b"}}, "ingress": [{}]}
    assert "can only be used in a CiliumClusterwideNetworkPolicy" in _problems(spec)[0]
    assert _problems(spec, "CiliumClusterwideNetworkPolicy") == []


def test_services_labels_selectors_and_kafka() -> None:
    spec: dict[str, Any] = {
        "endpointSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
        "labels": [{"key": "k", "source": "cilium-generated"}],
        "egress": [{"toServices": [{}]}],
        "ingress": [
            {
                "toPorts": [
                    {
                        "ports": [{"port": "9092", "protocol": "TCP"}],
                        "rules": {"kafka": [{"role": "produce", "apiKey": "produce", "topic": "a/b"}]},
                    }
                ]
            }
        ],
    }
    assert _problems(spec) == [
        "spec.endpointSelector.matchExpressions[0].values: operator In needs at least one value",
        'spec.labels[0].source: the source "cilium-generated" is reserved',
        "spec.ingress[0].toPorts[0].rules.kafka[0]: role and apiKey are mutually exclusive",
        'spec.ingress[0].toPorts[0].rules.kafka[0].topic: "a/b" is not a valid Kafka topic name',
        "spec.egress[0].toServices[0]: set exactly one of k8sService or k8sServiceSelector",
    ]


def test_policy_without_rules() -> None:
    body = _cnp({})
    del body["spec"]
    assert [str(p) for p in validate_policy(parse_policy(body))] == [
        "spec: the policy has neither spec nor specs, so it has no rules"
    ]


def test_problems_in_specs_carry_their_index() -> None:
    body = _cnp(_l7({"http": [{}]}))
    body["specs"] = [_l7({"http": [{"path": "("}]})]
    (problem,) = validate_policy(parse_policy(body))
    assert problem.path == "specs[0].ingress[0].toPorts[0].rules.http[0].path"


def test_l7_rules_on_a_port_range_wider_than_the_proxy_serves_are_refused() -> None:
    """Envoy gets a filter chain per port: a wider range would stop the node's whole proxy configuration."""
    spec = _l7({"http": [{"method": "GET"}]})
    spec["ingress"][0]["toPorts"][0]["ports"][0]["endPort"] = 80 + 255
    assert _problems(spec) == []
    spec["ingress"][0]["toPorts"][0]["ports"][0]["endPort"] = 80 + 256
    (problem,) = _problems(spec)
    assert problem.startswith("spec.ingress[0].toPorts[0].ports[0].endPort: L7 rules cover at most 256"), problem
