"""Every crds/examples object parses and validates; every crds/invalid object is refused with its message."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliary.operator.api import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    PolicyParseError,
    parse_policy,
)
from ciliary.operator.api.lb_ippool import PoolInvalidError, parse_pool
from ciliary.operator.api.validation import validate_policy

ROOT = Path(__file__).resolve().parents[4]
POOL_KIND = "CiliumLoadBalancerIPPool"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "crds" / "invalid").glob("*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object per file"
    return docs[0]


def _headers(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep and key in {"expect", "message", "parse-message"}:
            found[key] = value.strip()
    return found


def _refusal(body: dict[str, Any]) -> str | None:
    """All messages the Python side produces for ``body``, or None when it accepts it."""
    if body.get("kind") == POOL_KIND:
        try:
            parse_pool(body)
        except PoolInvalidError as error:
            return str(error)
        return None
    try:
        policy = parse_policy(body)
    except PolicyParseError as error:
        return str(error)
    problems = validate_policy(policy)
    return "; ".join(str(p) for p in problems) if problems else None


def test_there_are_examples_and_invalid_objects() -> None:
    assert len(EXAMPLES) >= 15
    assert len(INVALID) >= 14


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_validates_and_round_trips(path: Path) -> None:
    body = _load(path)
    if body["kind"] == POOL_KIND:
        assert parse_pool(body).spec.to_wire() == body["spec"]
        return
    policy = parse_policy(body)
    assert validate_policy(policy) == []
    assert policy.rules(), "an example has at least one rule"
    # The model keeps everything the user wrote: dumping gives the same object back.
    assert policy.to_wire() == json.loads(json.dumps(body))


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_object_is_refused_with_its_message(path: Path) -> None:
    headers = _headers(path)
    assert headers.get("expect") in {"schema", "operator"}, f"{path.name}: needs '# expect: schema|operator'"
    assert headers.get("message"), f"{path.name}: needs '# message: <substring>'"
    refusal = _refusal(_load(path))
    assert refusal is not None, f"{path.name} was accepted"
    expected = headers.get("parse-message", headers["message"])
    assert expected in refusal


@pytest.mark.parametrize(
    "path", [p for p in INVALID if _headers(p).get("expect") == "operator"], ids=lambda p: p.name
)
def test_operator_layer_objects_parse_and_fail_only_validation(path: Path) -> None:
    policy = parse_policy(_load(path))
    assert validate_policy(policy), "an operator-layer object fits the schema but fails validation"


def test_kinds_and_rules() -> None:
    cnp = parse_policy(_load(ROOT / "crds/examples/specs-list.yaml"))
    assert isinstance(cnp, CiliumNetworkPolicy) and not cnp.is_clusterwide
    assert [r.description for r in cnp.rules()] == ["Frontends reach the API", "The API reaches its database"]
    assert [p for p, _ in cnp.rules_with_paths()] == ["specs[0]", "specs[1]"]
    ccnp = parse_policy(_load(ROOT / "crds/examples/ccnp-all-namespaces.yaml"))
    assert isinstance(ccnp, CiliumClusterwideNetworkPolicy) and ccnp.is_clusterwide
    assert ccnp.namespace == ""


def test_spec_and_specs_are_concatenated() -> None:
    body = _load(ROOT / "crds/examples/specs-list.yaml")
    body["spec"] = copy.deepcopy(body["specs"][0])
    body["spec"]["description"] = "first"
    policy = parse_policy(body)
    assert [r.description for r in policy.rules()][0] == "first"
    assert len(policy.rules()) == 3


def test_top_level_description_is_kept() -> None:
    policy = parse_policy(_load(ROOT / "crds/examples/top-level-description.yaml"))
    assert policy.description == "L7 policy to restrict access to specific HTTP call"


def test_body_from_the_api_server_parses_with_status() -> None:
    body = json.loads((FIXTURES / "rule1-from-apiserver.json").read_text())
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Apply"}]
    body["metadata"]["finalizers"] = ["ciliary.io/x"]
    policy = parse_policy(body)
    assert policy.metadata.uid and policy.metadata.generation == 1
    assert policy.status is not None and policy.status.nodes is not None
    node = policy.status.nodes["node-a"]
    assert node.ok and node.enforcing and node.local_policy_revision == 28
    assert policy.status.enforcement == "2/2 nodes"
    assert policy.status.conditions and policy.status.conditions[0].status == "True"


def test_parse_error_names_the_object_and_the_field() -> None:
    body = _load(ROOT / "crds/examples/starwars-rule1.yaml")
    body["metadata"]["namespace"] = "galaxy"
    body["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "70000"
    with pytest.raises(PolicyParseError) as caught:
        parse_policy(body)
    error = caught.value
    assert (error.kind, error.namespace, error.name) == ("CiliumNetworkPolicy", "galaxy", "rule1")
    assert error.message == "spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range 0-65535"
    assert str(error).startswith("CiliumNetworkPolicy galaxy/rule1: ")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"kind": "NetworkPolicy"}, 'kind: Unsupported value: "NetworkPolicy"'),
        ({"apiVersion": "cilium.io/v1"}, "apiVersion: Unsupported value"),
        ({"metadata": {}}, "metadata.name: Required value"),
    ],
)
def test_envelope_problems(change: dict[str, Any], expected: str) -> None:
    body = _load(ROOT / "crds/examples/starwars-rule1.yaml")
    body.update(change)
    with pytest.raises(PolicyParseError) as caught:
        parse_policy(body)
    assert expected in caught.value.message
