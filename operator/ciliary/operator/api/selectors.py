"""Label selectors as they appear in policy rules (data only).

Owns :class:`LabelSelector` and :class:`LabelSelectorRequirement`: the shape of
``endpointSelector``, ``nodeSelector``, ``fromEndpoints``/``toEndpoints``,
``fromRequires``/``toRequires`` and ``k8sServiceSelector.selector``. What a
selector *means* (source prefixes, namespace scoping, matching identities) is
not here; that belongs to ``ciliary.operator.policy.selection``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ciliary.operator.api.base import WireModel

SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
"""Set-based operators of a label requirement."""


class LabelSelectorRequirement(WireModel):
    """One set-based requirement: ``key`` related to ``values`` by ``operator``."""

    key: str = Field(description="Label key, optionally with a source prefix such as 'k8s:'.")
    operator: SelectorOperator = Field(description="How the key relates to the values.")
    values: tuple[str, ...] | None = Field(
        default=None,
        description="Values for In and NotIn; empty for Exists and DoesNotExist.",
    )


class LabelSelector(WireModel):
    """A Kubernetes-style label selector; ``{}`` selects everything in scope."""

    match_labels: dict[str, str] | None = Field(
        default=None,
        description="Key/value pairs that must all be present.",
    )
    match_expressions: tuple[LabelSelectorRequirement, ...] | None = Field(
        default=None,
        description="Set-based requirements that must all hold.",
    )

    def is_empty(self) -> bool:
        """True when the selector has no requirement at all (it selects every endpoint in scope)."""
        return not self.match_labels and not self.match_expressions
