"""Policy rules: peers and directions.

Owns :class:`Rule` (the content of ``spec`` and of each ``specs[]`` item) and
the direction sections it holds: :class:`IngressRule`, :class:`EgressRule`
and their deny variants :class:`IngressDenyRule` and :class:`EgressDenyRule`,
together with the peer shapes they use (:class:`CIDRRule`,
:class:`ServiceSelector`, entity names). Port and L7 shapes are in
:mod:`ciliary.operator.api.ports`; label selectors in
:mod:`ciliary.operator.api.selectors`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ciliary.operator.api.base import WireModel
from ciliary.operator.api.ports import FQDNSelector, ICMPRule, PortDenyRule, PortRule
from ciliary.operator.api.selectors import LabelSelector

Entity = Literal[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "ingress",
    "unmanaged",
    "none",
]
"""Named classes of peers, as accepted by ``fromEntities`` / ``toEntities``."""

SELECTOR_CONFLICT = "endpointSelector and nodeSelector are mutually exclusive: set only one of them"
SELECTOR_MISSING = "one of endpointSelector or nodeSelector is required"
DIRECTION_MISSING = "a rule needs at least one of ingress, ingressDeny, egress or egressDeny"
"""Messages shared with the CRD's x-kubernetes-validations, so both layers say the same thing."""


class CIDRRule(WireModel):
    """An address range with optional excluded sub-ranges."""

    cidr: str = Field(description="IPv4 or IPv6 prefix in CIDR notation (a bare address is one host).")
    except_: tuple[str, ...] | None = Field(
        default=None,
        alias="except",
        description="Prefixes inside 'cidr' that this rule does not cover.",
    )


class K8sServiceNamespace(WireModel):
    """A Service by name."""

    service_name: str | None = Field(default=None, description="Name of the Service.")
    namespace: str | None = Field(default=None, description="Namespace; defaults to the policy's namespace.")


class K8sServiceSelectorNamespace(WireModel):
    """Services by label."""

    selector: LabelSelector = Field(description="Label selector over Services.")
    namespace: str | None = Field(default=None, description="Namespace; empty means every namespace.")


class ServiceSelector(WireModel):
    """A ``toServices`` entry: one Service by name or Services by label (exactly one is set)."""

    k8s_service: K8sServiceNamespace | None = Field(
        default=None, alias="k8sService", description="A Service by name."
    )
    k8s_service_selector: K8sServiceSelectorNamespace | None = Field(
        default=None, alias="k8sServiceSelector", description="Services by label."
    )


class IngressCommon(WireModel):
    """Peer fields shared by ingress allow and deny rules."""

    from_endpoints: tuple[LabelSelector, ...] | None = Field(
        default=None, description="Peer endpoints by label; [{}] selects every endpoint in scope."
    )
    from_requires: tuple[LabelSelector, ...] | None = Field(
        default=None,
        description="Requirements added to every fromEndpoints selector of rules selecting the same endpoint.",
    )
    from_cidr: tuple[str, ...] | None = Field(
        default=None, alias="fromCIDR", description="Peer address ranges outside the cluster."
    )
    from_cidr_set: tuple[CIDRRule, ...] | None = Field(
        default=None, alias="fromCIDRSet", description="Peer address ranges with exceptions."
    )
    from_entities: tuple[Entity, ...] | None = Field(
        default=None, description="Peer classes such as world, host or cluster."
    )
    icmps: tuple[ICMPRule, ...] | None = Field(default=None, description="ICMP types this rule covers.")


class IngressRule(IngressCommon):
    """Incoming traffic to allow."""

    to_ports: tuple[PortRule, ...] | None = Field(
        default=None, description="Local ports the peers may reach, with optional L7 rules."
    )


class IngressDenyRule(IngressCommon):
    """Incoming traffic to deny; deny wins over any allow."""

    to_ports: tuple[PortDenyRule, ...] | None = Field(default=None, description="Local ports to deny.")


class EgressCommon(WireModel):
    """Peer fields shared by egress allow and deny rules."""

    to_endpoints: tuple[LabelSelector, ...] | None = Field(
        default=None, description="Peer endpoints by label; [{}] selects every endpoint in scope."
    )
    to_requires: tuple[LabelSelector, ...] | None = Field(
        default=None,
        description="Requirements added to every toEndpoints selector of rules selecting the same endpoint.",
    )
    to_cidr: tuple[str, ...] | None = Field(
        default=None, alias="toCIDR", description="Destination address ranges outside the cluster."
    )
    to_cidr_set: tuple[CIDRRule, ...] | None = Field(
        default=None, alias="toCIDRSet", description="Destination address ranges with exceptions."
    )
    to_entities: tuple[Entity, ...] | None = Field(
        default=None, description="Destination classes such as world, host or cluster."
    )
    to_services: tuple[ServiceSelector, ...] | None = Field(
        default=None, description="Destinations given as Kubernetes Services."
    )
    icmps: tuple[ICMPRule, ...] | None = Field(default=None, description="ICMP types this rule covers.")


class EgressRule(EgressCommon):
    """Outgoing traffic to allow."""

    to_fqdns: tuple[FQDNSelector, ...] | None = Field(
        default=None, alias="toFQDNs", description="Destinations by DNS name or pattern."
    )
    to_ports: tuple[PortRule, ...] | None = Field(
        default=None, description="Destination ports, with optional L7 rules."
    )


class EgressDenyRule(EgressCommon):
    """Outgoing traffic to deny; deny wins over any allow."""

    to_ports: tuple[PortDenyRule, ...] | None = Field(default=None, description="Destination ports to deny.")


class RuleLabel(WireModel):
    """A label that identifies a rule (metadata only)."""

    key: str = Field(min_length=1, description="Label key.")
    value: str | None = Field(default=None, description="Label value.")
    source: str | None = Field(default=None, description="Label source, e.g. 'unspec' or 'k8s'.")


class DefaultDenyConfig(WireModel):
    """Whether a rule switches its endpoints to default-deny, per direction (both default to true)."""

    ingress: bool | None = Field(default=None, description="Default-deny for ingress.")
    egress: bool | None = Field(default=None, description="Default-deny for egress.")


class Rule(WireModel):
    """One policy rule: which endpoints (or nodes) it selects and what traffic it allows or denies."""

    endpoint_selector: LabelSelector | None = Field(
        default=None, description="Pods the rule applies to (in a CNP, only pods of its namespace)."
    )
    node_selector: LabelSelector | None = Field(
        default=None, description="Nodes the rule applies to; only meaningful in a CCNP."
    )
    ingress: tuple[IngressRule, ...] | None = Field(default=None, description="Allowed incoming traffic.")
    ingress_deny: tuple[IngressDenyRule, ...] | None = Field(
        default=None, description="Denied incoming traffic."
    )
    egress: tuple[EgressRule, ...] | None = Field(default=None, description="Allowed outgoing traffic.")
    egress_deny: tuple[EgressDenyRule, ...] | None = Field(
        default=None, description="Denied outgoing traffic."
    )
    labels: tuple[RuleLabel, ...] | None = Field(default=None, description="Labels identifying the rule.")
    description: str | None = Field(default=None, description="Free-form text explaining the rule.")
    enable_default_deny: DefaultDenyConfig | None = Field(
        default=None, description="Whether the rule switches its endpoints to default-deny."
    )

    @model_validator(mode="after")
    def _check_shape(self) -> Rule:
        if self.endpoint_selector is not None and self.node_selector is not None:
            raise ValueError(SELECTOR_CONFLICT)
        if self.endpoint_selector is None and self.node_selector is None:
            raise ValueError(SELECTOR_MISSING)
        if all(d is None for d in (self.ingress, self.ingress_deny, self.egress, self.egress_deny)):
            raise ValueError(DIRECTION_MISSING)
        return self

    @property
    def selects_nodes(self) -> bool:
        """True when the rule selects nodes (host firewall) rather than endpoints."""
        return self.node_selector is not None
