"""Pydantic model of Kubernetes ``networking.k8s.io/v1`` NetworkPolicy, and the one function that parses it.

Owns :class:`NetworkPolicy` (with :class:`NetworkPolicySpec`, its rules,
peers, ports and :class:`IPBlock`), :func:`parse_network_policy` and
:func:`network_policy_problems` (what the API server would refuse, checked again
here because a body can also come from a test or an older server). Unknown
fields are refused rather than ignored: a peer field this model does not know
could otherwise turn into "every peer". What the rules *mean* (translation into
the rules resolution reads) is in ``ciliary.operator.policy.netpol_compiling``.

Defaulting follows the API server's: a port's protocol is TCP; ``policyTypes``
unset means ``Ingress``, plus ``Egress`` when the policy has egress rules
(:meth:`NetworkPolicySpec.effective_policy_types`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError

from ciliary.operator.api.base import WireModel
from ciliary.operator.api.errors import (
    PolicyInvalidError,
    PolicyParseError,
    PolicyProblem,
    problems_from_validation_error,
)
from ciliary.operator.api.policies import PolicyMetadata
from ciliary.operator.api.selectors import LabelSelector

NETPOL_API_VERSION = "networking.k8s.io/v1"
NETPOL_KIND = "NetworkPolicy"
PolicyType = Literal["Ingress", "Egress"]
NetpolProtocol = Literal["TCP", "UDP", "SCTP"]


class IPBlock(WireModel):
    """A CIDR with excepted sub-ranges."""

    cidr: str = Field(description="IPv4 or IPv6 prefix.")
    except_: tuple[str, ...] | None = Field(default=None, alias="except",
                                            description="Prefixes inside cidr that are not matched.")


class NetworkPolicyPeer(WireModel):
    """One ``from``/``to`` item: pods (by pod and/or namespace labels) or an IP block."""

    pod_selector: LabelSelector | None = Field(default=None, description="Pods by label.")
    namespace_selector: LabelSelector | None = Field(default=None, description="Namespaces by label.")
    ip_block: IPBlock | None = Field(default=None, description="Addresses by CIDR.")


class NetworkPolicyPort(WireModel):
    """One port (range) of a rule."""

    protocol: NetpolProtocol | None = Field(default=None, description="TCP (default), UDP or SCTP.")
    port: int | str | None = Field(default=None, description="Number or container port name; unset: all.")
    end_port: int | None = Field(default=None, description="Last port of a range starting at port.")

    @property
    def effective_protocol(self) -> NetpolProtocol:
        return self.protocol or "TCP"


class NetworkPolicyIngressRule(WireModel):
    """Traffic allowed in: from all of ``from`` (empty: every source) on ``ports`` (empty: every port)."""

    from_: tuple[NetworkPolicyPeer, ...] | None = Field(default=None, alias="from", description="Sources.")
    ports: tuple[NetworkPolicyPort, ...] | None = Field(default=None, description="Destination ports.")


class NetworkPolicyEgressRule(WireModel):
    """Traffic allowed out: to all of ``to`` (empty: every destination) on ``ports`` (empty: every port)."""

    to: tuple[NetworkPolicyPeer, ...] | None = Field(default=None, description="Destinations.")
    ports: tuple[NetworkPolicyPort, ...] | None = Field(default=None, description="Destination ports.")


class NetworkPolicySpec(WireModel):
    """The policy: which pods, which directions, what is allowed."""

    pod_selector: LabelSelector = Field(description="Pods of the namespace the policy applies to.")
    ingress: tuple[NetworkPolicyIngressRule, ...] | None = Field(default=None, description="Allowed in.")
    egress: tuple[NetworkPolicyEgressRule, ...] | None = Field(default=None, description="Allowed out.")
    policy_types: tuple[PolicyType, ...] | None = Field(default=None, description="Directions it governs.")

    def effective_policy_types(self) -> frozenset[str]:
        """``policyTypes`` as the API server defaults it."""
        if self.policy_types:
            return frozenset(self.policy_types)
        return frozenset({"Ingress", "Egress"} if self.egress else {"Ingress"})


class NetworkPolicy(WireModel):
    """A ``networking.k8s.io/v1`` NetworkPolicy."""

    api_version: Literal["networking.k8s.io/v1"] = Field(description="API version.")
    kind: Literal["NetworkPolicy"] = Field(description="Object kind.")
    metadata: PolicyMetadata = Field(description="Object metadata.")
    spec: NetworkPolicySpec = Field(description="The policy.")
    status: dict[str, Any] | None = Field(
        default=None, description="Whatever the server keeps there (some versions had conditions); unused.")

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or ""

    @property
    def is_clusterwide(self) -> bool:
        return False


def parse_network_policy(body: Mapping[str, Any]) -> NetworkPolicy:
    """Parse an object body (``kind``/``apiVersion`` filled in when a list left them out)."""
    data = dict(body)
    data.setdefault("kind", NETPOL_KIND)
    data.setdefault("apiVersion", NETPOL_API_VERSION)
    meta = data.get("metadata") if isinstance(data.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    try:
        return NetworkPolicy.model_validate(data)
    except ValidationError as error:
        raise PolicyParseError.from_problems(NETPOL_KIND, str(meta.get("namespace") or ""),
                                             str(meta.get("name") or ""),
                                             problems_from_validation_error(error)) from None


def _prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _port_problems(port: NetworkPolicyPort, path: str) -> list[PolicyProblem]:
    out: list[PolicyProblem] = []
    if isinstance(port.port, int) and not 1 <= port.port <= 65535:
        out.append(PolicyProblem(f"{path}.port", f"port {port.port} is out of range 1-65535"))
    if isinstance(port.port, str) and (not port.port or port.port.isdigit() or len(port.port) > 15):
        out.append(PolicyProblem(f"{path}.port", f'"{port.port}" is not a valid port name'))
    if port.end_port is not None:
        if not isinstance(port.port, int):
            out.append(PolicyProblem(f"{path}.endPort", "endPort needs a numeric port"))
        elif not port.port <= port.end_port <= 65535:
            out.append(PolicyProblem(f"{path}.endPort", f"endPort {port.end_port} must be in {port.port}-65535"))
    return out


def _peer_problems(peer: NetworkPolicyPeer, path: str) -> list[PolicyProblem]:
    block = peer.ip_block
    if block is None:
        if peer.pod_selector is None and peer.namespace_selector is None:
            return [PolicyProblem(path, "must specify a peer (podSelector, namespaceSelector or ipBlock)")]
        return []
    if peer.pod_selector is not None or peer.namespace_selector is not None:
        return [PolicyProblem(path, "ipBlock may not be combined with podSelector or namespaceSelector")]
    cidr = _prefix(block.cidr)
    if cidr is None:
        return [PolicyProblem(f"{path}.ipBlock.cidr", f'"{block.cidr}" is not a valid CIDR')]
    out: list[PolicyProblem] = []
    for j, text in enumerate(block.except_ or ()):
        excepted = _prefix(text)
        if excepted is None or excepted.version != cidr.version or not excepted.subnet_of(cidr):  # type: ignore[arg-type]
            out.append(PolicyProblem(f"{path}.ipBlock.except[{j}]", f'"{text}" is not a prefix within {block.cidr}'))
        elif excepted.prefixlen == cidr.prefixlen:
            out.append(PolicyProblem(f"{path}.ipBlock.except[{j}]", f'"{text}" must be strictly within {block.cidr}'))
    return out


def network_policy_problems(policy: NetworkPolicy) -> list[PolicyProblem]:
    """Everything the API server's validation would refuse (empty: valid)."""
    out: list[PolicyProblem] = []
    sections: list[tuple[str, str, tuple[NetworkPolicyPeer, ...] | None, tuple[NetworkPolicyPort, ...] | None]] = []
    sections += [(f"spec.ingress[{i}]", "from", r.from_, r.ports) for i, r in enumerate(policy.spec.ingress or ())]
    sections += [(f"spec.egress[{i}]", "to", r.to, r.ports) for i, r in enumerate(policy.spec.egress or ())]
    for path, peer_field, peers, ports in sections:
        for j, peer in enumerate(peers or ()):
            out.extend(_peer_problems(peer, f"{path}.{peer_field}[{j}]"))
        for j, port in enumerate(ports or ()):
            out.extend(_port_problems(port, f"{path}.ports[{j}]"))
    return out


def validate_network_policy(policy: NetworkPolicy) -> None:
    """Raise :class:`PolicyInvalidError` naming every problem; return when the policy is valid."""
    problems = network_policy_problems(policy)
    if problems:
        raise PolicyInvalidError(NETPOL_KIND, policy.namespace, policy.name, problems)
