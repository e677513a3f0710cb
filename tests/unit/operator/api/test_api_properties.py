"""Property tests (hypothesis) for ports, port ranges and CIDR exceptions."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ciliary.operator.api import PolicyParseError, parse_policy
from ciliary.operator.api.ports import PortProtocol
from ciliary.operator.api.validation import validate_policy

ROOT = Path(__file__).resolve().parents[4]


def _crd_port_pattern() -> re.Pattern[str]:
    crd = yaml.safe_load((ROOT / "crds/ciliumnetworkpolicies.cilium.io.yaml").read_text())
    rule = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    port = rule["properties"]["ingress"]["items"]["properties"]["toPorts"]["items"]["properties"]["ports"]
    schema = port["items"]["properties"]["port"]
    assert schema["maxLength"] == 15
    return re.compile(schema["pattern"])


CRD_PORT = _crd_port_pattern()


def _policy(port: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [port]}]}], **(extra or {})},
    }


@given(st.integers(min_value=0, max_value=65535), st.sampled_from(["TCP", "UDP", "SCTP", "ANY"]))
def test_any_valid_port_round_trips(number: int, protocol: str) -> None:
    port = {"port": str(number), "protocol": protocol}
    policy = parse_policy(_policy(port))
    assert policy.to_wire()["spec"]["ingress"][0]["toPorts"][0]["ports"][0] == port
    assert policy.rules()[0].ingress[0].to_ports[0].ports[0].number == number  # type: ignore[index]
    assert validate_policy(policy) == []


@given(st.integers(min_value=65536, max_value=10**15 - 1))
def test_any_port_above_65535_is_refused(number: int) -> None:
    with pytest.raises(PolicyParseError, match=f"port {number} is out of range 0-65535"):
        parse_policy(_policy({"port": str(number)}))
    assert not CRD_PORT.match(str(number))


@settings(max_examples=300)
@given(st.text(alphabet="abzAZ09-_!.", min_size=1, max_size=17))
def test_model_and_crd_agree_on_port_syntax(text: str) -> None:
    crd_accepts = len(text) <= 15 and CRD_PORT.match(text) is not None
    try:
        PortProtocol(port=text)
    except ValidationError:
        model_accepts = False
    else:
        model_accepts = True
    assert model_accepts == crd_accepts


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_end_port_below_port_is_a_problem(port: int, end_port: int) -> None:
    policy = parse_policy(_policy({"port": str(port), "endPort": end_port, "protocol": "TCP"}))
    problems = validate_policy(policy)
    if end_port != 0 and end_port < port:
        assert [p.message for p in problems] == [f"endPort {end_port} is lower than port {port}"]
        assert problems[0].path == "spec.ingress[0].toPorts[0].ports[0].endPort"
    else:
        assert problems == []


@given(
    st.ip_addresses(v=4),
    st.integers(0, 32),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)
def test_cidr_except_must_be_inside(base: Any, prefix: int, other: Any, other_prefix: int) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    carved = ipaddress.ip_network(f"{other}/{other_prefix}", strict=False)
    body = _policy({"port": "80"})
    body["spec"]["ingress"] = [{"fromCIDRSet": [{"cidr": str(network), "except": [str(carved)]}]}]
    problems = validate_policy(parse_policy(body))
    if carved.subnet_of(network):  # type: ignore[arg-type]
        assert problems == []
    else:
        assert [str(p) for p in problems] == [
            f"spec.ingress[0].fromCIDRSet[0].except[0]: except {carved} is not inside cidr {network}"
        ]
