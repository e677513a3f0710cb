"""TLS interception material: which Secrets a node's intent needs, and their items put into it (pure).

Owns :func:`references` (the Secrets the TLS contexts of a set of intents name, after
:func:`fill_namespaces`), :func:`material` (one context's PEM items out of one Secret's data,
with Cilium's item rules) and :func:`attach` (an intent with its ``tls_secrets`` filled in, and
the problems found). The reconciler (the async shell) fetches and watches exactly the Secrets
:func:`references` names and calls :func:`attach` before publishing, so a Secret's items go
only into the intents of nodes hosting an endpoint whose entries (egress interception, ingress
termination) name it, and a changed
Secret changes those intents' content (rotation: they are published again).

Item rules (Cilium's ``TLSContext``): ``trustedCA``/``certificate``/``privateKey`` name the
items, defaulting to ``ca.crt``/``tls.crt``/``tls.key``; a default item is used only when the
Secret has it, a named item must exist, and at least one item must be found. On top, what the
proxy needs: a terminating context must give a certificate and its private key (that match),
an originating context a CA (the destination, or on ingress the pod, is always verified; Ciliary
never re-originates TLS without checking the server). A ``ca.crt`` in a terminating context makes the proxy require
a client certificate signed by it; a certificate in an originating context is presented as the
proxy's client certificate (as in Cilium).

Fail closed: an entry whose TLS contexts cannot be completed (missing Secret, missing item,
bad PEM, key not matching, two different contexts on one entry) loses its HTTP rules (``http``
None while still redirecting): the node drops its connections (``PROXY_UNAVAILABLE``) and
reports the policy not enforcing; the problem names the Secret (never its content) for the
policy's status and a Warning Event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ciliary.operator.intents import (
    DirectionPolicy,
    EndpointIntent,
    NodeIntent,
    PolicyEntry,
    TlsContextRef,
    TlsInterception,
    TlsMaterial,
)

SecretKey = tuple[str, str]
"""(namespace, name) of a Secret."""
SecretData = Mapping[str, bytes]
"""A Secret's items, decoded."""
Role = Literal["terminatingTLS", "originatingTLS"]

DEFAULT_CA, DEFAULT_CERT, DEFAULT_KEY = "ca.crt", "tls.crt", "tls.key"


class TlsMaterialError(ValueError):
    """A TLS context that cannot be built from its Secret (the message names the Secret, never its data)."""

    def __init__(self, ref: TlsContextRef, role: Role, message: str) -> None:
        super().__init__(f"{role} Secret {ref.namespace}/{ref.name}: {message}")
        self.ref = ref
        self.role = role


@dataclass(frozen=True, slots=True)
class TlsProblem:
    """One policy whose TLS interception cannot be enforced on a node, and why."""

    policy_uid: str
    message: str


def _directions(endpoint: EndpointIntent) -> tuple[tuple[str, DirectionPolicy], ...]:
    return ("ingress", endpoint.ingress), ("egress", endpoint.egress)


def _map_entries(intent: NodeIntent, change: Callable[[PolicyEntry, str], PolicyEntry]) -> NodeIntent:
    """``intent`` with ``change(entry, endpoint namespace)`` applied to every entry of both directions."""
    endpoints = []
    for endpoint in intent.endpoints:
        update = {}
        for name, policy in _directions(endpoint):
            entries = tuple(change(entry, endpoint.namespace) for entry in policy.entries)
            if entries != policy.entries:
                update[name] = DirectionPolicy(enforced=policy.enforced, entries=entries)
        endpoints.append(endpoint.model_copy(update=update) if update else endpoint)
    out = tuple(endpoints)
    return intent if out == intent.endpoints else intent.model_copy(update={"endpoints": out})


def fill_namespaces(intent: NodeIntent) -> NodeIntent:
    """``intent`` with each TLS context's empty Secret namespace set to its endpoint's namespace."""
    return _map_entries(intent, _filled)


def _filled(entry: PolicyEntry, namespace: str) -> PolicyEntry:
    if entry.http is None or not any(r.tls is not None for r in entry.http):
        return entry

    def ref(context: TlsContextRef) -> TlsContextRef:
        return context if context.namespace else context.model_copy(update={"namespace": namespace})

    rules = tuple(r if r.tls is None else r.model_copy(update={"tls": r.tls.model_copy(update={
        "terminating": ref(r.tls.terminating),
        "originating": None if r.tls.originating is None else ref(r.tls.originating)})}) for r in entry.http)
    return entry.model_copy(update={"http": rules})


def contexts(intent: NodeIntent) -> Iterable[tuple[TlsContextRef, Role]]:
    """Every TLS context the intent's entries (both directions) name (namespaces filled in)."""
    for endpoint in intent.endpoints:
        for _, policy in _directions(endpoint):
            for entry in policy.entries:
                for rule in entry.http or ():
                    if rule.tls is not None:
                        yield rule.tls.terminating, "terminatingTLS"
                        if rule.tls.originating is not None:
                            yield rule.tls.originating, "originatingTLS"


def references(intents: Iterable[NodeIntent]) -> set[SecretKey]:
    """The Secrets the given intents (after :func:`fill_namespaces`) need."""
    return {(ref.namespace, ref.name) for intent in intents for ref, _ in contexts(intent)}


def _item(ref: TlsContextRef, role: Role, data: SecretData, named: str | None, default: str, what: str) -> str:
    name = named or default
    raw = data.get(name)
    if raw is None:
        if named:
            raise TlsMaterialError(ref, role, f"{what} item {named!r} not found in the Secret")
        return ""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TlsMaterialError(ref, role, f"item {name!r} is not PEM text") from None
    if "-----BEGIN " not in text:
        raise TlsMaterialError(ref, role, f"item {name!r} is not PEM text")
    return text


def material(ref: TlsContextRef, role: Role, data: SecretData | None) -> TlsMaterial:
    """The PEM items of one context; raises :class:`TlsMaterialError` (see the module docstring)."""
    if data is None:
        raise TlsMaterialError(ref, role, "not found")
    ca = _item(ref, role, data, ref.trusted_ca, DEFAULT_CA, "trusted CA")
    cert = _item(ref, role, data, ref.certificate, DEFAULT_CERT, "certificate")
    key = _item(ref, role, data, ref.private_key, DEFAULT_KEY, "private key")
    if not (ca or cert or key):
        raise TlsMaterialError(ref, role, f"TLS certificates not found in the Secret (no {DEFAULT_CA}, "
                                          f"{DEFAULT_CERT} or {DEFAULT_KEY})")
    if bool(cert) != bool(key):
        raise TlsMaterialError(ref, role, "a certificate needs its private key and a key its certificate")
    if role == "terminatingTLS" and not cert:
        raise TlsMaterialError(ref, role, f"no certificate and private key ({ref.certificate or DEFAULT_CERT}, "
                                          f"{ref.private_key or DEFAULT_KEY}) to show the pod")
    if role == "originatingTLS" and not ca:
        raise TlsMaterialError(ref, role, f"no trusted CA ({ref.trusted_ca or DEFAULT_CA}) to verify the "
                                          "destination with")
    if ca:
        _check_certificates(ref, role, ca, "trusted CA")
    if cert:
        leaf = _check_certificates(ref, role, cert, "certificate")
        try:
            private = serialization.load_pem_private_key(key.encode(), password=None)
        except (ValueError, TypeError):
            raise TlsMaterialError(ref, role, "the private key is not an unencrypted PEM key") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if private.public_key().public_bytes(serialization.Encoding.DER, public) != \
                leaf.public_key().public_bytes(serialization.Encoding.DER, public):
            raise TlsMaterialError(ref, role, "the private key does not match the certificate")
    return TlsMaterial(trusted_ca=ca, certificate=cert, private_key=key)


def _check_certificates(ref: TlsContextRef, role: Role, pem: str, what: str) -> x509.Certificate:
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise TlsMaterialError(ref, role, f"the {what} is not a PEM certificate") from None
    return certificates[0]


def attach(intent: NodeIntent, secrets: Mapping[SecretKey, SecretData | None]
           ) -> tuple[NodeIntent, list[TlsProblem]]:
    """``intent`` (namespaces filled in) with the material of every TLS context it names in ``tls_secrets``;
    an entry whose contexts fail loses its HTTP rules (fail closed). ``secrets``: the Secrets fetched (None or
    absent: not found)."""
    intent = fill_namespaces(intent)
    found: dict[str, TlsMaterial] = {}
    failed: dict[str, str] = {}
    for ref, role in contexts(intent):
        key = ref.key()
        if key in found or key in failed:
            continue
        try:
            found[key] = material(ref, role, secrets.get((ref.namespace, ref.name)))
        except TlsMaterialError as exc:
            failed[key] = str(exc)
    problems: dict[tuple[str, str], None] = {}

    def checked(entry: PolicyEntry, _namespace: str) -> PolicyEntry:
        why = _entry_problem(entry, failed)
        if not why:
            return entry
        for rule in entry.rules:
            problems[(rule.uid, why)] = None
        return entry.model_copy(update={"http": None})

    out = _map_entries(intent, checked)
    used = {ref.key() for ref, _ in contexts(out)}
    out = out.model_copy(update={"tls_secrets": {k: v for k, v in sorted(found.items()) if k in used}})
    return out, [TlsProblem(uid, message) for uid, message in problems]


def _entry_problem(entry: PolicyEntry, failed: Mapping[str, str]) -> str:
    if entry.http is None:
        return ""
    kinds: set[TlsInterception | None] = {rule.tls for rule in entry.http}
    if len(kinds) > 1 and any(k is not None for k in kinds):
        return "conflicting TLS contexts (or TLS and plain HTTP rules) on one port and peer: not enforced"
    for rule in entry.http:
        if rule.tls is not None:
            for ref in rule.tls.contexts():
                if ref.key() in failed:
                    return failed[ref.key()]
    return ""
