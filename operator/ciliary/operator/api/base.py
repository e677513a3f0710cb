"""The wire-model base shared by every ``cilium.io/v2`` model in this package.

Owns the pydantic configuration that makes a model mirror the CRD schema:
camelCase wire names (through an alias generator, with explicit aliases where
Cilium's spelling is not plain camelCase, e.g. ``fromCIDR``), unknown fields
refused, instances frozen. Every other module in ``ciliary.operator.api``
derives its models from :class:`WireModel`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """Base for models parsed from, and dumped to, Kubernetes objects.

    Python attributes are snake_case; the wire names are camelCase. Build
    instances from wire data with ``Model.model_validate(data)`` and write them
    back with :meth:`to_wire`.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        str_strip_whitespace=False,
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """Return the object as the JSON-compatible dict the API server stores (unset fields omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
