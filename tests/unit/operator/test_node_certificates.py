"""Node etcd certificates as data (``kube.node_certificates``): reading CSRs, signing, CSR conditions;
the enroller's stale-user rule and the agent's view of a CSR (``nodeagent.enroll``)."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ciliary.nodeagent import enroll
from ciliary.operator.kube import node_certificates as nc
from ciliary.operator.kube.enroller import stale_node_users
from ciliary.operator.kube.enrollment import NODE_NAME_EXTRA, SIGNER_NAME, decide

AGENT = "system:serviceaccount:kube-system:cy-ciliary-agent"
NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)


def make_ca(days: int = 3650) -> nc.SigningAuthority:
    """An RSA CA like Helm's genCA (the chart's etcd CA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliary-etcd-ca")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return nc.SigningAuthority.from_pem(cert.public_bytes(serialization.Encoding.PEM), pem_key)


@pytest.fixture(scope="module")
def ca() -> nc.SigningAuthority:
    return make_ca()


def csr_obj(request_pem: bytes, *, username: str = AGENT, node: str = "node-1",
            usages: tuple[str, ...] = nc.CLIENT_USAGES, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "ciliary-etcd-node-1-abcdef12-x7k2p", "uid": "u1"},
            "spec": {"request": base64.b64encode(request_pem).decode(), "signerName": SIGNER_NAME,
                     "username": username, "extra": {NODE_NAME_EXTRA: [node]}, "usages": list(usages)},
            "status": status}


def test_the_agents_own_request_reads_back_and_is_approved() -> None:
    key_pem, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    assert b"PRIVATE KEY" in key_pem
    request, csr = nc.request_from_csr(csr_obj(request_pem))
    assert request.subject_cn == "ciliary-node-node-1" and not request.subject_has_other_fields
    assert request.san_count == 0 and request.extra == {NODE_NAME_EXTRA: ["node-1"]}
    assert decide(request, agent_service_account=AGENT).approve
    assert csr.is_signature_valid


def test_another_nodes_cn_reads_back_and_is_refused() -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-2")
    request, _ = nc.request_from_csr(csr_obj(request_pem))
    decision = decide(request, agent_service_account=AGENT)
    assert not decision.approve and "is not 'ciliary-node-node-1'" in decision.reason


def test_extra_subject_fields_and_sans_are_seen() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliary-node-node-1"),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("etcd.example"), x509.DNSName("x")]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    request, _ = nc.request_from_csr(csr_obj(csr.public_bytes(serialization.Encoding.PEM)))
    assert request.subject_has_other_fields and request.san_count == 2
    assert "more than its CN" in decide(request, agent_service_account=AGENT).reason


@pytest.mark.parametrize("request_b64", ["!!!", base64.b64encode(b"not pem").decode(),
                                         base64.b64encode(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                                          b"-----END CERTIFICATE REQUEST-----\n").decode()])
def test_unreadable_requests_raise_a_typed_error(request_b64: str) -> None:
    obj = csr_obj(b"")
    obj["spec"]["request"] = request_b64
    with pytest.raises(nc.CertificateRequestError) as caught:
        nc.request_from_csr(obj)
    assert caught.value.name == "ciliary-etcd-node-1-abcdef12-x7k2p"


def test_a_request_whose_signature_does_not_verify_is_refused() -> None:
    # sign the request of one key, then swap in another public key: the self-signature no longer verifies
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliary-node-node-1")])
    good = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key_a, hashes.SHA256())
    der_a = good.public_bytes(serialization.Encoding.DER)
    pub_a = key_a.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_b = key_b.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub_a in der_a and len(pub_a) == len(pub_b)
    forged = x509.load_der_x509_csr(der_a.replace(pub_a, pub_b))
    with pytest.raises(nc.CertificateRequestError, match="signature does not verify"):
        nc.parse_request("forged", forged.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_signing_issues_a_client_certificate_for_the_cn_alone(ca: nc.SigningAuthority, kind: str) -> None:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliary-node-node-1"),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters")]))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    cert = nc.sign(ca, csr, validity=datetime.timedelta(days=365), now=NOW)
    # the CN only: the organisation and the CA flag the request asked for are not copied
    assert cert.subject.rfc4514_string() == "CN=ciliary-node-node-1"
    assert cert.issuer == ca.certificate.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and usage.key_encipherment is (kind == "rsa")
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=365)
    assert cert.not_valid_before_utc == NOW - nc.BACKDATE
    ca_key = ca.key.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    cert.verify_directly_issued_by(ca.certificate)


def test_a_certificate_never_outlives_its_ca() -> None:
    short = make_ca(days=30)
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    cert = nc.sign(short, x509.load_pem_x509_csr(request_pem), validity=datetime.timedelta(days=365), now=NOW)
    assert cert.not_valid_after_utc == short.certificate.not_valid_after_utc


def test_conditions_certificate_and_settled() -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    obj = csr_obj(request_pem)
    assert not nc.settled(obj)
    approved = nc.with_condition(obj, "Approved", "R", "ok", NOW)
    approved = nc.with_condition(approved, "Approved", "R", "ok again", NOW)  # added once
    assert nc.conditions(approved) == {"Approved": "True"} and not nc.settled(approved)
    assert [c["message"] for c in approved["status"]["conditions"]] == ["ok again"]
    assert nc.settled(nc.with_condition(obj, "Denied", "R", "no", NOW))
    assert nc.settled(nc.with_condition(obj, "Failed", "R", "broken", NOW))
    cert = nc.sign(make_ca(), x509.load_pem_x509_csr(request_pem), validity=datetime.timedelta(days=1), now=NOW)
    issued = nc.with_certificate(approved, cert)
    assert nc.settled(issued) and issued["status"]["conditions"] == approved["status"]["conditions"]
    assert obj["status"] == {}  # copies, never the caller's object
    # what the agent sees of each state
    assert enroll.outcome(issued) == ("issued", nc.certificate_pem(cert).decode())
    assert enroll.outcome(nc.with_condition(obj, "Denied", "R", "CN is wrong", NOW)) == ("denied", "CN is wrong")
    assert enroll.outcome(approved) == ("pending", "")


def test_the_agents_csr_object() -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-n1")
    obj = enroll.csr_object("n1", "0123456789abcdef", request_pem)
    assert obj["metadata"] == {"generateName": "ciliary-etcd-n1-01234567-"}
    assert obj["spec"]["signerName"] == SIGNER_NAME and obj["spec"]["usages"] == ["digital signature",
                                                                                   "client auth"]
    assert base64.b64decode(obj["spec"]["request"]) == request_pem
    long_node = "a" * 253
    assert len(enroll.csr_object(long_node, "u" * 36, request_pem)["metadata"]["generateName"]) + 5 <= 253


def test_stale_node_users_are_only_node_users_of_absent_nodes() -> None:
    users = ["root", "ciliary-operator", "ciliary-agents", "ciliary-node-n1", "ciliary-node-n10", "ciliary-node-n2",
             "kube-apiserver"]
    assert stale_node_users(users, ["n1", "n2"]) == ["ciliary-node-n10"]
    assert stale_node_users(users, []) == ["ciliary-node-n1", "ciliary-node-n10", "ciliary-node-n2"]


def test_credentials_are_written_private(tmp_path: Any) -> None:
    enroll.write_credentials(tmp_path / "d", b"KEY", b"CERT")
    for name, data in (("tls.key", b"KEY"), ("tls.crt", b"CERT")):
        path = tmp_path / "d" / name
        assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["tls.crt", "tls.key"]
