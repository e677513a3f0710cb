"""The CRD schemas and the pydantic models describe the same API, field for field.

Walks each CRD's openAPIV3Schema next to the model that parses it and checks,
at every level, that the camelCase property names agree in both directions,
that required fields agree, that enums equal the models' Literal values and
that scalar types match. Also checks that the CNP and CCNP CRDs carry the same
schema and that every model field has a description.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from ciliary.operator.api import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    base,
    policies,
    ports,
    rules,
    selectors,
)

ROOT = Path(__file__).resolve().parents[4]
CRDS = {
    "ciliumnetworkpolicies.cilium.io.yaml": CiliumNetworkPolicy,
    "ciliumclusterwidenetworkpolicies.cilium.io.yaml": CiliumClusterwideNetworkPolicy,
}
SCALARS: dict[str, set[type]] = {"string": {str}, "integer": {int}, "boolean": {bool}}


def _schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / file).read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _leaves(annotation: Any) -> list[Any]:
    """Flatten Optional/Union into its members (None dropped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [] if annotation is type(None) else [annotation]


def _wire_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {(info.alias or name): info for name, info in model.model_fields.items()}


def _check_object(schema: dict[str, Any], model: type[BaseModel], path: str, *, root: bool = False) -> None:
    fields = _wire_fields(model)
    props = schema.get("properties", {})
    assert set(props) == set(fields), (
        f"{path} ({model.__name__}): only in CRD {sorted(set(props) - set(fields))}, "
        f"only in model {sorted(set(fields) - set(props))}"
    )
    if not root:
        required = {name for name, info in fields.items() if info.is_required()}
        assert set(schema.get("required", [])) == required, f"{path}: required fields differ"
    for name, sub in props.items():
        if root and name in ("apiVersion", "kind"):
            continue  # fixed by the API server per resource; the models pin them with Literal
        _check_value(sub, fields[name].annotation, f"{path}.{name}")


def _check_value(schema: dict[str, Any], annotation: Any, path: str) -> None:
    leaves = _leaves(annotation)
    kind = schema.get("type")
    if kind == "array":
        (leaf,) = leaves
        assert typing.get_origin(leaf) in (tuple, list), f"{path}: CRD has an array, model has {leaf}"
        _check_value(schema["items"], typing.get_args(leaf)[0], f"{path}[]")
        return
    if kind == "object":
        (leaf,) = leaves
        if "properties" in schema:
            assert isinstance(leaf, type) and issubclass(leaf, BaseModel), (
                f"{path}: CRD has an object, model {leaf}"
            )
            _check_object(schema, leaf, path)
        elif "additionalProperties" in schema:
            assert typing.get_origin(leaf) is dict, f"{path}: CRD has a map, model has {leaf}"
            _check_value(schema["additionalProperties"], typing.get_args(leaf)[1], f"{path}{{}}")
        return  # free-form objects (metadata, preserve-unknown) are not compared
    if schema.get("x-kubernetes-int-or-string"):
        assert set(leaves) == {int, str}, f"{path}: int-or-string in CRD, model has {leaves}"
        return
    (leaf,) = leaves
    if typing.get_origin(leaf) is typing.Literal:
        assert list(typing.get_args(leaf)) == schema.get("enum"), f"{path}: enum differs"
        assert kind == "string", path
        return
    assert "enum" not in schema, f"{path}: CRD has an enum, the model does not"
    assert leaf in SCALARS[str(kind)], f"{path}: CRD type {kind}, model type {leaf}"


@pytest.mark.parametrize("file", sorted(CRDS))
def test_crd_and_models_agree(file: str) -> None:
    _check_object(_schema(file), CRDS[file], "", root=True)


def test_cnp_and_ccnp_share_one_schema() -> None:
    cnp = _schema("ciliumnetworkpolicies.cilium.io.yaml")
    ccnp = _schema("ciliumclusterwidenetworkpolicies.cilium.io.yaml")
    for schema in (cnp, ccnp):
        schema.pop("description")
    assert cnp == ccnp


@pytest.mark.parametrize("file", sorted(CRDS))
def test_crd_envelope(file: str) -> None:
    crd = yaml.safe_load((ROOT / "crds" / file).read_text())
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert spec["group"] == "cilium.io" and spec["names"]["categories"] == ["cilium", "ciliary"]
    (version,) = spec["versions"]
    assert version["name"] == "v2" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Valid", "Enforcement", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    assert "x-kubernetes-preserve-unknown-fields" not in schema["properties"]["spec"]
    assert schema["properties"]["description"] == {
        "type": "string",
        "description": schema["properties"]["description"]["description"],
    }
    if spec["names"]["kind"] == "CiliumNetworkPolicy":
        assert spec["scope"] == "Namespaced" and spec["names"]["shortNames"] == ["cnp", "ciliumnp"]
    else:
        assert spec["scope"] == "Cluster" and spec["names"]["shortNames"] == ["ccnp"]


def _models() -> list[type[BaseModel]]:
    found = []
    for module in (base, selectors, ports, rules, policies):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        assert info.description, f"{model.__name__}.{name} has no description"


def test_the_drift_check_notices_a_difference() -> None:
    schema = _schema("ciliumnetworkpolicies.cilium.io.yaml")
    schema["properties"]["spec"]["properties"]["ingress"]["items"]["properties"]["fromNodes"] = {
        "type": "string"
    }
    with pytest.raises(AssertionError, match="only in CRD \\['fromNodes'\\]"):
        _check_object(schema, CiliumNetworkPolicy, "", root=True)
    schema = _schema("ciliumnetworkpolicies.cilium.io.yaml")
    schema["properties"]["spec"]["properties"]["egress"]["items"]["properties"]["toEntities"]["items"][
        "enum"
    ].pop()
    with pytest.raises(AssertionError, match="enum differs"):
        _check_object(schema, CiliumNetworkPolicy, "", root=True)
