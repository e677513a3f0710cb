"""Per-node etcd client certificates as data: read a CertificateSigningRequest, sign one, make a request.

Pure (``cryptography`` only, no I/O): the enroller (``kube.enroller``) feeds it the CSR object
it got from the API and the CA it holds; the agent's ``etcd-enroll`` step
(``ciliary.nodeagent.enroll``) uses :func:`new_key_and_request` to make its key and request.

* :func:`request_from_csr` turns a ``certificates.k8s.io/v1`` CSR (as a JSON mapping) into the
  :class:`~ciliary.operator.kube.enrollment.NodeCertificateRequest` that ``enrollment.decide``
  judges (and the parsed request). A request whose PEM cannot be read, or whose signature does not verify, raises
  :class:`CertificateRequestError` (the enroller denies it with that message).
* :func:`sign` issues the certificate: subject = the requested CN only, the request's public key,
  client authentication only, not a CA, never valid after the CA itself.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ciliary.operator.kube.enrollment import NodeCertificateRequest

CLIENT_USAGES = ("digital signature", "client auth")
"""What the agent asks for (``ALLOWED_USAGES`` of the enrollment rule also admits key encipherment)."""
BACKDATE = datetime.timedelta(minutes=5)
"""notBefore lies this far in the past so that a node whose clock is a little behind accepts it."""


class CertificateRequestError(ValueError):
    """A CSR whose request cannot be used (not PEM, not a CSR, bad signature); carries the CSR's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"certificate request {name}: {problem}")
        self.name = name


@dataclass(frozen=True)
class SigningAuthority:
    """The CA that signs node certificates (the etcd CA: etcd trusts client certificates it issued)."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> SigningAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"the CA key is a {type(key).__name__}; RSA or EC expected")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def parse_request(name: str, pem: bytes) -> x509.CertificateSigningRequest:
    """The PKCS#10 request in ``pem``, its self-signature verified."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateRequestError(name, f"spec.request is not a PEM certificate request ({exc})") from exc
    if not csr.is_signature_valid:
        raise CertificateRequestError(name, "the request's signature does not verify")
    return csr


def _common_names(subject: x509.Name) -> list[str]:
    return [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def request_from_csr(obj: Mapping[str, Any]) -> tuple[NodeCertificateRequest, x509.CertificateSigningRequest]:
    """The fields ``enrollment.decide`` judges, and the parsed request, from a CSR object (base64 PEM)."""
    name = str(obj.get("metadata", {}).get("name", ""))
    spec = obj.get("spec", {})
    try:
        pem = base64.b64decode(spec.get("request", ""), validate=True)
    except ValueError as exc:
        raise CertificateRequestError(name, "spec.request is not base64") from exc
    csr = parse_request(name, pem)
    cns = _common_names(csr.subject)
    others = [a for a in csr.subject if a.oid != NameOID.COMMON_NAME]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_count = len(list(san))
    except x509.ExtensionNotFound:
        san_count = 0
    return NodeCertificateRequest(
        name=name, signer_name=str(spec.get("signerName", "")), username=str(spec.get("username", "")),
        extra={str(k): [str(v) for v in vs] for k, vs in (spec.get("extra") or {}).items()},
        usages=[str(u) for u in spec.get("usages") or []],
        subject_cn=cns[0] if len(cns) == 1 else "",
        subject_has_other_fields=bool(others) or len(cns) > 1, san_count=san_count), csr


def sign(authority: SigningAuthority, csr: x509.CertificateSigningRequest, *, validity: datetime.timedelta,
         now: datetime.datetime) -> x509.Certificate:
    """A client-authentication certificate for ``csr``'s CN and key, issued by ``authority``.

    Only the CN is copied from the request (no other subject field, no SAN, no extension the
    requester asked for); validity ends at ``now + validity`` or the CA's own end, whichever is first.
    """
    cns = _common_names(csr.subject)
    if len(cns) != 1:
        raise CertificateRequestError("", f"the request names {len(cns)} common names, not one")
    public_key = csr.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CertificateRequestError("", f"a {type(public_key).__name__} key cannot sign TLS handshakes here")
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    not_after = min(now + validity, authority.certificate.not_valid_after_utc)
    ca_ski = authority.certificate.extensions
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_ski.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cns[0])]))
               .issuer_name(authority.certificate.subject)
               .public_key(public_key)
               .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
               .not_valid_before(now - BACKDATE)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=is_rsa, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(aki, critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    return builder.sign(authority.key, hashes.SHA256())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_key_and_request(common_name: str) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a request for ``common_name`` alone: (key PEM, request PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def conditions(obj: Mapping[str, Any]) -> dict[str, str]:
    """The CSR's condition types mapped to their status (``{"Approved": "True"}``)."""
    return {str(c.get("type")): str(c.get("status", "True"))
            for c in (obj.get("status") or {}).get("conditions") or []}


def settled(obj: Mapping[str, Any]) -> bool:
    """True when nothing is left to do: a certificate was issued, or the request was denied or failed."""
    if (obj.get("status") or {}).get("certificate"):
        return True
    found = conditions(obj)
    return found.get("Denied") == "True" or found.get("Failed") == "True"


def with_condition(obj: Mapping[str, Any], kind: str, reason: str, message: str,
                   now: datetime.datetime) -> dict[str, Any]:
    """A copy of the CSR with condition ``kind`` (Approved, Denied, Failed) added once, status True."""
    copy = dict(obj)
    status = dict(copy.get("status") or {})
    existing = [c for c in status.get("conditions") or [] if c.get("type") != kind]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    status["conditions"] = [*existing, {"type": kind, "status": "True", "reason": reason, "message": message,
                                        "lastUpdateTime": stamp, "lastTransitionTime": stamp}]
    copy["status"] = status
    return copy


def with_certificate(obj: Mapping[str, Any], cert: x509.Certificate) -> dict[str, Any]:
    """A copy of the CSR carrying ``cert`` in ``status.certificate`` (base64 of the PEM, as the API stores it)."""
    copy = dict(obj)
    copy["status"] = {**(copy.get("status") or {}),
                      "certificate": base64.b64encode(certificate_pem(cert)).decode()}
    return copy
