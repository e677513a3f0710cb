"""The two policy kinds, their status, and the one function that parses them.

Owns :class:`CiliumNetworkPolicy` (namespaced) and
:class:`CiliumClusterwideNetworkPolicy` (cluster-scoped), their metadata and
status models (:class:`PolicyStatus`, :class:`NodePolicyStatus`,
:class:`PolicyCondition`), and :func:`parse_policy`, which turns a raw object
body (as kopf or the API server hands it over) into one of the two models or
raises :class:`~ciliary.operator.api.errors.PolicyParseError`. Handlers call
:func:`parse_policy` once at the edge; everything inward takes models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from ciliary.operator.api.base import WireModel
from ciliary.operator.api.errors import PolicyParseError, PolicyProblem, problems_from_validation_error
from ciliary.operator.api.rules import Rule

API_VERSION = "cilium.io/v2"
CNP_KIND = "CiliumNetworkPolicy"
CCNP_KIND = "CiliumClusterwideNetworkPolicy"


class PolicyMetadata(BaseModel):
    """The parts of ``metadata`` the operator uses; the API server owns the rest, so other keys are ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: str = Field(description="Object name.")
    namespace: str | None = Field(default=None, description="Namespace; None for a cluster-scoped policy.")
    uid: str | None = Field(default=None, description="Unique id assigned by the API server.")
    generation: int | None = Field(default=None, description="Spec generation assigned by the API server.")
    resource_version: str | None = Field(default=None, description="Version of the stored object.")
    labels: dict[str, str] | None = Field(default=None, description="Object labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Object annotations.")


class NodePolicyStatus(WireModel):
    """How one node handles the policy (the value of ``status.nodes[<node>]``)."""

    ok: bool | None = Field(default=None, description="The node parsed and imported the policy.")
    enforcing: bool | None = Field(default=None, description="The node's datapath enforces the policy.")
    error: str | None = Field(default=None, description="Why the node could not import or enforce it.")
    last_updated: str | None = Field(default=None, description="When the node last reported (RFC 3339).")
    local_policy_revision: int | None = Field(
        default=None, description="The node's policy revision that includes this policy."
    )
    annotations: dict[str, str] | None = Field(
        default=None, description="The policy's annotations as the node saw them."
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class PolicyCondition(WireModel):
    """A standard Kubernetes condition, e.g. ``Valid``."""

    type: str = Field(description="Condition type, e.g. Valid.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, description="Machine-readable CamelCase reason.")
    message: str | None = Field(default=None, description="Human-readable details.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this condition was computed from."
    )


class PolicyStatus(WireModel):
    """Observed state of a policy, written by the operator."""

    nodes: dict[str, NodePolicyStatus] | None = Field(
        default=None, description="Per-node state by node name."
    )
    derivative_policies: dict[str, Any] | None = Field(
        default=None, description="State of derived policies (kept as is)."
    )
    conditions: tuple[PolicyCondition, ...] | None = Field(default=None, description="Standard conditions.")
    enforcement: str | None = Field(default=None, description='Enforcement summary, e.g. "2/2 nodes".')
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation the operator last processed."
    )


class PolicyObject(WireModel):
    """Fields shared by both policy kinds."""

    api_version: Literal["cilium.io/v2"] = Field(description="API version; always cilium.io/v2.")
    metadata: PolicyMetadata = Field(description="Object metadata.")
    description: str | None = Field(
        default=None,
        description="Top-level free text found in older examples; kept, without effect (use spec.description).",
    )
    spec: Rule | None = Field(default=None, description="One policy rule.")
    specs: tuple[Rule, ...] | None = Field(default=None, description="Further rules, added to 'spec'.")
    status: PolicyStatus | None = Field(default=None, description="Observed state.")

    def rules(self) -> list[Rule]:
        """All rules of the object: ``spec`` (if set) followed by ``specs``."""
        return [path_rule[1] for path_rule in self.rules_with_paths()]

    def rules_with_paths(self) -> list[tuple[str, Rule]]:
        """Each rule with its field path (``spec`` or ``specs[i]``), for error messages."""
        found: list[tuple[str, Rule]] = []
        if self.spec is not None:
            found.append(("spec", self.spec))
        for index, rule in enumerate(self.specs or ()):
            found.append((f"specs[{index}]", rule))
        return found

    @property
    def name(self) -> str:
        """The object's name."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """The object's namespace; "" for a cluster-wide policy."""
        return self.metadata.namespace or ""


class CiliumNetworkPolicy(PolicyObject):
    """A namespaced policy: rules for the pods of its namespace."""

    kind: Literal["CiliumNetworkPolicy"] = Field(description="Object kind.")

    @property
    def is_clusterwide(self) -> bool:
        """False: a CNP is namespaced."""
        return False


class CiliumClusterwideNetworkPolicy(PolicyObject):
    """A cluster-scoped policy: rules for pods of every namespace, and for nodes."""

    kind: Literal["CiliumClusterwideNetworkPolicy"] = Field(description="Object kind.")

    @property
    def is_clusterwide(self) -> bool:
        """True: a CCNP is cluster-scoped."""
        return True


AnyPolicy = CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy
"""Either policy kind."""

_MODELS: dict[str, type[CiliumNetworkPolicy] | type[CiliumClusterwideNetworkPolicy]] = {
    CNP_KIND: CiliumNetworkPolicy,
    CCNP_KIND: CiliumClusterwideNetworkPolicy,
}


def parse_policy(body: Mapping[str, Any]) -> CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy:
    """Parse an object body into a policy model.

    Raises :class:`PolicyParseError` naming the object and listing every
    problem as ``<field path>: <message>``, e.g.
    ``spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range 0-65535``.
    """
    kind = str(body.get("kind") or "")
    raw_meta = body.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "")
    model = _MODELS.get(kind)
    if model is None:
        problem = PolicyProblem(
            "kind", f'Unsupported value: "{kind}": supported values: "{CNP_KIND}", "{CCNP_KIND}"'
        )
        raise PolicyParseError.from_problems(kind or "<unknown kind>", namespace, name, [problem])
    try:
        return model.model_validate(dict(body))
    except ValidationError as error:
        problems = problems_from_validation_error(error)
        raise PolicyParseError.from_problems(kind, namespace, name, problems) from None
