"""The operator-to-agent wire schema: what one node must enforce.

The operator resolves every policy into one :class:`NodeIntent` per node and
publishes it into etcd (``keyspace.node_intent_key``); the node agent parses it
back with :func:`parse_node_intent` and turns it into eBPF map contents. Nothing
here is per-packet logic: the datapath evaluates exactly these entries, and
``ciliary policy trace`` evaluates them the same way (``evaluate_entries``).

Conventions
- identity 0 in a :class:`PolicyEntry` means "any peer" (an L4-only rule);
- protocol 0 means any protocol, port range (0, 0) means any port;
- for ICMP packets the "port" is the ICMP type: an entry with ``icmp_type``
  set covers only ICMP packets of that type (like Cilium's policy key);
- an endpoint is default-deny in a direction only when ``enforced`` is True;
- deny entries beat allow entries whatever their specificity.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from enum import Enum, StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
"""Bumped on any incompatible change; agents refuse intents of a version they do not know."""

HOST_SIDE_ADDRESS = "169.254.1.1"
"""Address of the host side of every pod veth (the pods' gateway, set by the CNI plugin).

A packet from it comes from the pod's own node, so every ipcache maps it to host."""

ANY_IDENTITY = 0
ANY_PROTOCOL = 0


class IntentSchemaError(ValueError):
    """An intent that this agent cannot apply (unknown schema version or malformed)."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"node intent for {node!r}: {message}")
        self.node = node
        self.message = message


class Protocol(int, Enum):
    """IP protocol numbers the policy language names."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    SCTP = 132


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class RuleRef(_Frozen):
    """Which rule of which policy produced an entry (for explain and flows)."""

    kind: Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"] = Field(
        description="Kind of the policy object."
    )
    namespace: str = Field(default="", description="Namespace of a CNP or NetworkPolicy; empty for a CCNP.")
    name: str = Field(description="Name of the policy object.")
    uid: str = Field(default="", description="UID of the policy object.")
    rule_index: int = Field(description="Index of the rule within spec (0) or specs.")
    section: str = Field(description="ingress, egress, ingressDeny or egressDeny, with its item index.")

    def describe(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where} rule {self.rule_index} {self.section}"


HeaderMismatch = Literal["LOG", "ADD", "DELETE", "REPLACE"]


class SecretRef(_Frozen):
    """A Secret holding one header value (``headerMatches[].secret``); ``namespace`` empty in a policy means
    the selected endpoint's namespace (the operator fills it in before publishing)."""

    namespace: str = Field(default="", description="Namespace of the Secret (filled in by the operator).")
    name: str = Field(description="Name of the Secret.")

    def key(self) -> str:
        """The key of this Secret's value in :attr:`NodeIntent.header_secrets` (no secret in it)."""
        return f"{self.namespace}/{self.name}"


class HeaderMatch(_Frozen):
    """One ``headerMatches[]`` item: ``mismatch`` None means the header must have the expected value (or, with
    an empty value, be present) for the rule to allow the request; with an action the rule allows the request
    either way and the proxy applies the action when the header does not match. The expected value is
    ``value``, or with ``secret`` the Secret's only item (:attr:`NodeIntent.header_secrets`)."""

    name: str = Field(description="Header name (case-insensitive).")
    value: str = Field(default="", description="Expected value; empty: presence only (ignored with secret).")
    secret: SecretRef | None = Field(default=None, description="The Secret whose only item is the expected "
                                                               "value; its value is in header_secrets.")
    mismatch: HeaderMismatch | None = Field(default=None, description="Action on mismatch; None: no match, "
                                                                       "no allow.")


class TlsContextRef(_Frozen):
    """A ``terminatingTLS``/``originatingTLS`` context: the Secret and the item names written in the policy.

    ``namespace`` empty in a policy means the selected endpoint's namespace; the operator fills it in
    before publishing. Item names None: Cilium's defaults (``ca.crt``, ``tls.crt``, ``tls.key``), each used
    only when present; a named item must exist."""

    namespace: str = Field(default="", description="Namespace of the Secret (filled in by the operator).")
    name: str = Field(description="Name of the Secret.")
    trusted_ca: str | None = Field(default=None, description="Item with the trusted CA bundle (default ca.crt).")
    certificate: str | None = Field(default=None, description="Item with the certificate chain (default tls.crt).")
    private_key: str | None = Field(default=None, description="Item with the private key (default tls.key).")

    def key(self) -> str:
        """The key of this context's material in :attr:`NodeIntent.tls_secrets` (no secret in it)."""
        items = [self.trusted_ca, self.certificate, self.private_key]
        suffix = "" if items == [None, None, None] else "?" + ",".join(i or "" for i in items)
        return f"{self.namespace}/{self.name}{suffix}"


class TlsInterception(_Frozen):
    """HTTP rules inside TLS. Egress: the proxy terminates the pod's TLS with ``terminating``'s certificate
    and re-originates TLS to the destination, validating it against ``originating``'s CA (both required).
    Ingress: the proxy terminates the client's TLS with ``terminating``'s certificate and forwards to the
    pod over TLS validated against ``originating``'s CA, or, without ``originating``, as plain HTTP."""

    terminating: TlsContextRef = Field(description="terminatingTLS: the certificate the client is shown.")
    originating: TlsContextRef | None = Field(default=None, description="originatingTLS: the CA the upstream "
                                                                         "is checked with; None (ingress "
                                                                         "only): plain HTTP to the pod.")

    def contexts(self) -> tuple[TlsContextRef, ...]:
        return (self.terminating,) if self.originating is None else (self.terminating, self.originating)
    server_names: tuple[str, ...] = Field(default=(), description="serverNames: allowed SNI values; empty: any.")


class TlsMaterial(_Frozen):
    """The PEM items of one TLS context, read from its Secret by the operator (only in the intents of nodes
    hosting a selected endpoint). Never printed: the fields are left out of ``repr``."""

    trusted_ca: str = Field(default="", repr=False, description="PEM CA bundle; empty: none.")
    certificate: str = Field(default="", repr=False, description="PEM certificate chain; empty: none.")
    private_key: str = Field(default="", repr=False, description="PEM private key; empty: none.")


class HeaderSecret(_Frozen):
    """A header value read from a Secret by the operator (only in the intents of nodes hosting a selected
    endpoint). Never printed: left out of ``repr``."""

    value: str = Field(default="", repr=False, description="The expected header value.")


class HttpRule(_Frozen):
    """One allowed kind of HTTP request (``toPorts[].rules.http[]``): every field that is set must match.

    ``method``, ``path`` and ``host`` are regular expressions matched against the whole value
    (``path`` against the whole request target, query string included, as Cilium's proxy does);
    ``headers`` are ``"Name"`` (present) or ``"Name: value"`` (exact value). An empty rule
    allows every request (visibility only)."""

    method: str = Field(default="", description="Regex over the whole method; empty: any.")
    path: str = Field(default="", description="Regex over the whole path (with query); empty: any.")
    host: str = Field(default="", description="Regex over the whole host (:authority); empty: any.")
    headers: tuple[str, ...] = Field(default=(), description='"Name" or "Name: value", all required.')
    header_matches: tuple[HeaderMatch, ...] = Field(default=(), description="headerMatches (values inline or "
                                                                             "from Secrets).")
    rule: RuleRef | None = Field(default=None, description="The policy rule this HTTP rule belongs to.")
    tls: TlsInterception | None = Field(default=None, description="The rule applies inside TLS "
                                                                   "(terminatingTLS/originatingTLS).")


L7Parser = Literal["dns", "http", "kafka", "l7proto"]
"""Which L7 rules a redirecting entry carries, i.e. which node-local proxy must see its traffic."""


class DNSRule(_Frozen):
    """One ``rules.dns`` item: exactly one of the two is set (``dns_names`` matches them)."""

    match_name: str | None = Field(default=None, description="A fully qualified name, compared case-blind.")
    match_pattern: str | None = Field(default=None, description="A name where `*` stands for any run of "
                                                                "characters other than a dot; `*` alone is any name.")


class PolicyEntry(_Frozen):
    """One policy-map entry of one endpoint in one direction."""

    identity: int = Field(ge=0, lt=2**32, description="Peer security identity; 0 = any peer.")
    protocol: Protocol = Field(default=Protocol.ANY, description="IP protocol; ANY = every protocol.")
    port_low: int = Field(default=0, ge=0, le=65535, description="First destination port; 0 = any port.")
    port_high: int = Field(default=0, ge=0, le=65535, description="Last destination port (inclusive).")
    icmp_type: int | None = Field(default=None, ge=0, le=255, description="ICMP type for ICMP entries.")
    verdict: Verdict = Field(description="allow or deny.")
    l7_redirect: bool = Field(default=False, description="Matching traffic goes through the node's L7 proxy "
                                                           "for l7_parser (allow entries only).")
    l7_parser: L7Parser | None = Field(default=None, description="The L7 rules' kind when l7_redirect is set.")
    dns: tuple[DNSRule, ...] = Field(default=(), description="l7_parser dns: the names a query may ask for "
                                                             "(any rule matching allows it).")
    http: tuple[HttpRule, ...] | None = Field(
        default=None, description="Ingress HTTP entries: connections are redirected to the node's HTTP proxy, "
                                  "which allows only requests matching one of these rules (None: no redirect).")
    rules: tuple[RuleRef, ...] = Field(default=(), description="Rules this entry derives from.")
    visibility: bool = Field(default=False, description="The redirect is for observation only (a pod's "
                                                        "proxy-visibility annotation): its L7 rules allow every "
                                                        "request; no policy's status depends on it, and a node "
                                                        "without the proxy passes it at L4.")

    @model_validator(mode="after")
    def _ports_ordered(self) -> PolicyEntry:
        if self.port_low == 0 and self.port_high != 0:
            raise ValueError("port_high set without port_low")
        if self.port_high and self.port_high < self.port_low:
            raise ValueError(f"port range {self.port_low}-{self.port_high} is reversed")
        return self

    def covers(self, identity: int, protocol: int, port: int) -> bool:
        """Does this entry match a packet from/to ``identity`` on ``protocol``/``port``?"""
        if self.identity not in (ANY_IDENTITY, identity):
            return False
        if self.protocol is not Protocol.ANY and int(self.protocol) != protocol:
            return False
        if self.icmp_type is not None:
            return protocol == Protocol.ICMP and port == self.icmp_type
        if self.port_low == 0:
            return True
        high = self.port_high or self.port_low
        return self.port_low <= port <= high


class DirectionPolicy(_Frozen):
    """The policy of one endpoint in one direction."""

    enforced: bool = Field(default=False, description="True when some rule selects the endpoint: default-deny.")
    entries: tuple[PolicyEntry, ...] = Field(default=(), description="Allow and deny entries.")


class EndpointIntent(_Frozen):
    """A pod on this node, as the datapath must treat it."""

    namespace: str = Field(description="Pod namespace.")
    pod: str = Field(description="Pod name.")
    uid: str = Field(default="", description="Pod UID.")
    ipv4: str = Field(description="Pod IPv4 address.")
    identity: int = Field(ge=1, lt=2**32, description="Security identity of the pod.")
    ingress: DirectionPolicy = Field(default_factory=DirectionPolicy, description="Traffic to the pod.")
    egress: DirectionPolicy = Field(default_factory=DirectionPolicy, description="Traffic from the pod.")
    policies: tuple[str, ...] = Field(
        default=(), description="UIDs of the policies selecting the pod: a policy is enforcing on a node only "
                                "when every such local pod is in the kernel's endpoint map at the intent's revision.")

    @field_validator("ipv4")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))

    def direction(self, direction: Direction) -> DirectionPolicy:
        return self.ingress if direction is Direction.INGRESS else self.egress


class IpcacheEntry(_Frozen):
    """IP or CIDR -> security identity (longest prefix wins in the datapath)."""

    cidr: str = Field(description="IPv4 CIDR, /32 for a single address.")
    identity: int = Field(ge=1, lt=2**32, description="Security identity of that prefix.")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        return str(ipaddress.IPv4Network(value, strict=False))


class PolicyRef(_Frozen):
    """A policy that selects at least one endpoint of this node (status reports use it)."""

    kind: Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"] = Field(
        description="Kind.")
    namespace: str = Field(default="", description="Namespace of a CNP or NetworkPolicy; empty for a CCNP.")
    name: str = Field(description="Name.")
    uid: str = Field(description="UID.")
    generation: int = Field(default=0, description="metadata.generation the intent was resolved from.")


class NodeIntent(_Frozen):
    """Everything one node enforces, published as one etcd value."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Wire schema version.")
    node: str = Field(description="Node name.")
    revision: int = Field(ge=0, description="Policy repository revision this intent was resolved at.")
    endpoints: tuple[EndpointIntent, ...] = Field(default=(), description="Local endpoints.")
    ipcache: tuple[IpcacheEntry, ...] = Field(default=(), description="Cluster-wide IP -> identity.")
    identity_labels: Mapping[int, tuple[str, ...]] = Field(
        default_factory=dict, description="Identity -> its labels, for flows and explain."
    )
    policies: tuple[PolicyRef, ...] = Field(default=(), description="Policies selecting local endpoints.")
    fqdn_selectors: Mapping[int, DNSRule] = Field(
        default_factory=dict,
        description="toFQDNs selector identity -> its matchName/matchPattern. Entries name these identities as "
                    "peers; no address has one in the ipcache: the agent gives each address learnt from a DNS "
                    "answer its own node-local identity and copies, per endpoint that resolved the name, the "
                    "entries of every selector the name matches (ciliary.nodeagent.fqdn_expansion).")
    tls_secrets: Mapping[str, TlsMaterial] = Field(
        default_factory=dict, description="TlsContextRef.key() -> the context's PEM items, for the TLS contexts "
                                          "of this node's entries (never printed).")

    header_secrets: Mapping[str, HeaderSecret] = Field(
        default_factory=dict, description="SecretRef.key() -> the header value read from that Secret, for the "
                                          "headerMatches of this node's entries (never printed).")

    def __repr_args__(self) -> Any:  # the TLS material never reaches a log line through repr()
        return [(k, v) for k, v in super().__repr_args__() if k not in ("tls_secrets", "header_secrets")]

    def public_dump(self) -> dict[str, Any]:
        """The intent as JSON for people (``policy get --intent``): each TLS context's material replaced by
        which items it has and a short digest (rotation shows; the PEM never does), each header value read
        from a Secret by its length."""
        data = self.model_dump(mode="json", exclude={"tls_secrets", "header_secrets"})
        data["tls_secrets"] = {key: {item: _digest_text(value)
                                     for item, value in material.model_dump().items() if value}
                               for key, material in sorted(self.tls_secrets.items())}
        # a header value may be a short token: no digest (one could be guessed from it), only its length
        data["header_secrets"] = {key: f"<hidden, {len(secret.value)} bytes>"
                                  for key, secret in sorted(self.header_secrets.items())}
        return data

    def content_hash(self) -> str:
        """Hash of everything but the revision: unchanged content is never rewritten."""
        data = self.model_dump(mode="json", exclude={"revision"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def to_wire(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def _digest_text(value: str) -> str:
    """What people see of a secret value: its length and a short digest (rotation shows, the value never)."""
    return f"<{len(value)} bytes, sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]}>"


def parse_node_intent(node: str, raw: bytes | str | Mapping[str, Any]) -> NodeIntent:
    """Parse an etcd value into a :class:`NodeIntent`, refusing unknown schema versions."""
    try:
        data = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
    except json.JSONDecodeError as exc:
        raise IntentSchemaError(node, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IntentSchemaError(node, "not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IntentSchemaError(
            node, f"unknown schema version {version!r} (this agent speaks {SCHEMA_VERSION})"
        )
    try:
        return NodeIntent.model_validate(data)
    except ValidationError as exc:  # the message names fields, never values (an intent may carry TLS keys)
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise IntentSchemaError(node, f"{exc.error_count()} invalid field(s): {where}") from None
    except ValueError as exc:
        raise IntentSchemaError(node, str(exc)) from exc


class EntryDecision(_Frozen):
    """The outcome of evaluating one direction's entries for one packet."""

    allowed: bool
    reason: Literal["allowed", "denied-by-rule", "default-deny", "not-enforced"]
    entry: PolicyEntry | None = None


def evaluate_entries(
    policy: DirectionPolicy, *, identity: int, protocol: int, port: int
) -> EntryDecision:
    """Evaluate one direction exactly as the datapath does: deny first, then allow, else default."""
    if not policy.enforced:
        return EntryDecision(allowed=True, reason="not-enforced")
    matching = [e for e in policy.entries if e.covers(identity, protocol, port)]
    for entry in matching:
        if entry.verdict is Verdict.DENY:
            return EntryDecision(allowed=False, reason="denied-by-rule", entry=entry)
    for entry in matching:
        return EntryDecision(allowed=True, reason="allowed", entry=entry)
    return EntryDecision(allowed=False, reason="default-deny")


def sorted_entries(entries: Iterable[PolicyEntry]) -> tuple[PolicyEntry, ...]:
    """Deterministic order (so equal content hashes equal)."""
    return tuple(
        sorted(
            entries,
            key=lambda e: (e.verdict.value, e.identity, int(e.protocol), e.port_low, e.port_high, e.icmp_type or -1),
        )
    )
