"""Port rules: L4 ports and protocols, L7 rules, TLS contexts and ICMP types.

Owns the models under ``toPorts`` (:class:`PortRule`, :class:`PortDenyRule`,
:class:`PortProtocol`, :class:`L7Rules` and the per-protocol L7 rules,
:class:`TLSContext`) and under ``icmps`` (:class:`ICMPRule`). Checks that a
schema can state (port syntax and range, enums, list sizes) are made here so
that :func:`ciliary.operator.api.policies.parse_policy` refuses what the API
server would refuse; checks across fields (L7 rule on a UDP port, endPort
below port, bad regexes) are in :mod:`ciliary.operator.api.validation`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ciliary.operator.api.base import WireModel

Protocol = Literal["TCP", "UDP", "SCTP", "ANY"]
"""L4 protocols a port rule may name; ANY (the default) means TCP, UDP and SCTP."""

MAX_PORTS = 40
"""Most ports one PortRule may list (the same limit as the CRD's maxItems)."""

MAX_PORT = 65535

NUMERIC_PORT = re.compile(r"^[0-9]+$")
PORT_NAME = re.compile(r"^([a-zA-Z0-9]+-)*[a-zA-Z0-9]*[a-zA-Z][a-zA-Z0-9]*(-[a-zA-Z0-9]+)*$")
"""Letters, digits and single inner hyphens, with at least one letter (as in the CRD pattern)."""

MAX_PORT_NAME = 15


def port_number(port: str | None) -> int | None:
    """Return the port as an int when it is numeric; None for a named port or no port."""
    if port is None or not NUMERIC_PORT.match(port):
        return None
    return int(port)


class PortProtocol(WireModel):
    """One destination port (or a range from ``port`` to ``end_port``) with its protocol."""

    port: str | None = Field(
        default=None,
        description="Port number 0-65535 as a string (0: all ports) or the name of a container port.",
    )
    end_port: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PORT,
        description="Inclusive end of a port range that starts at 'port'; needs a numeric port.",
    )
    protocol: Protocol | None = Field(
        default=None,
        description="L4 protocol; unset or ANY matches TCP, UDP and SCTP.",
    )

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if NUMERIC_PORT.match(value):
            if len(value) > MAX_PORT_NAME or int(value) > MAX_PORT:
                raise ValueError(f"port {value} is out of range 0-{MAX_PORT}")
            return value
        if len(value) > MAX_PORT_NAME or not PORT_NAME.match(value):
            raise ValueError(
                f'port "{value}" is neither a number 0-{MAX_PORT} nor a port name '
                f"(at most {MAX_PORT_NAME} letters, digits and single inner hyphens, with a letter)"
            )
        return value

    @property
    def number(self) -> int | None:
        """The numeric port, or None when the port is named or unset."""
        return port_number(self.port)

    @property
    def is_named(self) -> bool:
        """True when ``port`` is a name to be resolved against the selected pods."""
        return self.port is not None and self.number is None


class SecretRef(WireModel):
    """A reference to a Kubernetes Secret."""

    namespace: str | None = Field(
        default=None,
        description="Namespace of the Secret; when empty, the namespace of the selected endpoint.",
    )
    name: str = Field(min_length=1, description="Name of the Secret.")


class TLSContext(WireModel):
    """TLS material for the proxy, taken from the items of a Secret."""

    secret: SecretRef = Field(description="The Secret holding the TLS material.")
    trusted_ca: str | None = Field(
        default=None,
        alias="trustedCA",
        description="Item with the trusted CA bundle (default ca.crt when present).",
    )
    certificate: str | None = Field(
        default=None, description="Item with the certificate chain (default tls.crt when present)."
    )
    private_key: str | None = Field(
        default=None, description="Item with the private key (default tls.key when present)."
    )


HeaderMismatchAction = Literal["LOG", "ADD", "DELETE", "REPLACE"]
"""What the proxy does when a header condition with an action does not hold."""


class HeaderMatch(WireModel):
    """A header condition, optionally with an action taken on mismatch."""

    name: str = Field(min_length=1, description="Header name.")
    value: str | None = Field(
        default=None,
        description="Expected value; also the fallback when the Secret cannot be read.",
    )
    secret: SecretRef | None = Field(
        default=None, description="Secret with exactly one item whose value is the expected value."
    )
    mismatch: HeaderMismatchAction | None = Field(
        default=None, description="Action on mismatch; unset means the rule does not allow the request."
    )


class PortRuleHTTP(WireModel):
    """An HTTP request filter; every field that is set must match."""

    path: str | None = Field(default=None, description="Regex that must match the whole request path.")
    method: str | None = Field(default=None, description="Regex that must match the whole request method.")
    host: str | None = Field(default=None, description="Regex that must match the whole host (authority).")
    headers: tuple[str, ...] | None = Field(
        default=None, description='Headers that must be present: "Name" or "Name: value".'
    )
    header_matches: tuple[HeaderMatch, ...] | None = Field(
        default=None, description="Header conditions with optional mismatch actions."
    )


KafkaRole = Literal["produce", "consume"]


class PortRuleKafka(WireModel):
    """A Kafka request filter."""

    role: KafkaRole | None = Field(
        default=None, description="Producer or consumer API keys; excludes apiKey."
    )
    api_key: str | None = Field(default=None, description="Kafka API key name or number.")
    api_version: str | None = Field(default=None, description="Kafka API version; empty matches all.")
    client_id: str | None = Field(
        default=None, alias="clientID", description="Client identifier; empty matches all."
    )
    topic: str | None = Field(default=None, max_length=255, description="Topic; empty matches all.")


class FQDNSelector(WireModel):
    """A DNS name (``matchName``) or wildcard pattern (``matchPattern``); exactly one is set."""

    match_name: str | None = Field(default=None, max_length=255, description="A literal DNS name.")
    match_pattern: str | None = Field(
        default=None,
        max_length=255,
        description="A DNS name where '*' stands for zero or more DNS characters other than '.'.",
    )


PortRuleDNS = FQDNSelector
"""A DNS rule under ``toPorts[].rules.dns`` has the shape of a toFQDNs entry."""


class L7Rules(WireModel):
    """Application-protocol rules for a port rule; at most one kind may be set."""

    http: tuple[PortRuleHTTP, ...] | None = Field(default=None, description="HTTP rules (any may match).")
    kafka: tuple[PortRuleKafka, ...] | None = Field(default=None, description="Kafka rules (any may match).")
    dns: tuple[PortRuleDNS, ...] | None = Field(default=None, description="DNS rules (egress only).")
    l7proto: str | None = Field(
        default=None, alias="l7proto", description="Name of the generic L7 parser for 'l7'."
    )
    l7: tuple[dict[str, str], ...] | None = Field(
        default=None, description="Generic key/value rules for the 'l7proto' parser."
    )

    def kinds(self) -> list[str]:
        """Names of the L7 rule kinds that are set, e.g. ``["http"]``; ``l7``/``l7proto`` count as one."""
        found = [name for name in ("http", "kafka", "dns") if getattr(self, name) is not None]
        if self.l7proto is not None or self.l7 is not None:
            found.append("l7proto")
        return found


class PortRule(WireModel):
    """Destination ports of an allow rule, with optional L7 rules and TLS settings."""

    ports: tuple[PortProtocol, ...] | None = Field(
        default=None, max_length=MAX_PORTS, description="Ports the rule applies to (40 at most)."
    )
    rules: L7Rules | None = Field(default=None, description="L7 rules enforced by the proxy.")
    terminating_tls: TLSContext | None = Field(
        default=None,
        alias="terminatingTLS",
        description="TLS settings for the proxy to terminate the incoming connection.",
    )
    originating_tls: TLSContext | None = Field(
        default=None,
        alias="originatingTLS",
        description="TLS settings for the proxy's own connection to the destination.",
    )
    server_names: tuple[str, ...] | None = Field(
        default=None, description="TLS server names (SNI) that must be requested."
    )


class PortDenyRule(WireModel):
    """Destination ports of a deny rule; deny rules carry no L7 rules."""

    ports: tuple[PortProtocol, ...] | None = Field(
        default=None, max_length=MAX_PORTS, description="Ports to deny (40 at most)."
    )


ICMPFamily = Literal["IPv4", "IPv6"]

ICMP_TYPE_NAMES = frozenset(
    {
        "EchoReply", "DestinationUnreachable", "Redirect", "Echo", "EchoRequest", "RouterAdvertisement",
        "RouterSelection", "TimeExceeded", "ParameterProblem", "Timestamp", "TimestampReply", "Photuris",
        "ExtendedEchoRequest", "ExtendedEchoReply", "PacketTooBig", "MulticastListenerQuery",
        "MulticastListenerReport", "MulticastListenerDone", "RouterSolicitation", "NeighborSolicitation",
        "NeighborAdvertisement", "RedirectMessage", "RouterRenumbering", "ICMPNodeInformationQuery",
        "ICMPNodeInformationResponse", "InverseNeighborDiscoverySolicitation",
        "InverseNeighborDiscoveryAdvertisement", "HomeAgentAddressDiscoveryRequest",
        "HomeAgentAddressDiscoveryReply", "MobilePrefixSolicitation", "MobilePrefixAdvertisement",
        "DuplicateAddressRequestCodeSuffix", "DuplicateAddressConfirmationCodeSuffix",
    }
)  # fmt: skip
"""ICMP/ICMPv6 type names accepted in place of numbers (the CRD pattern lists the same)."""


class ICMPField(WireModel):
    """One ICMP type, by number or name, in one IP family."""

    type: int | str = Field(description="ICMP type: a number 0-255 or its CamelCase name, e.g. EchoRequest.")
    family: ICMPFamily | None = Field(default=None, description="IP family of the type (default IPv4).")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if not 0 <= value <= 255:
                raise ValueError(f"ICMP type {value} is out of range 0-255")
            return value
        if value.isdigit() and len(value) <= 3 and int(value) <= 255:
            return value
        if value not in ICMP_TYPE_NAMES:
            raise ValueError(f'"{value}" is not an ICMP type number 0-255 or a known ICMP type name')
        return value


class ICMPRule(WireModel):
    """A group of allowed ICMP types."""

    fields: tuple[ICMPField, ...] | None = Field(
        default=None, max_length=MAX_PORTS, description="ICMP types (40 at most)."
    )
