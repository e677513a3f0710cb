"""The enroller's handling of one CSR (``kube.enroller.Enroller.handle``) over a fake API and a failing etcd:
bounded retries, Failed after them, a foreign approval never signed, settled requests left alone.
The real API and etcd paths are in tests/integration/deploy/test_node_enrollment.py."""

from __future__ import annotations

import copy
import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from test_node_certificates import AGENT, csr_obj, make_ca

from ciliary.operator.kube import enroller as enroller_mod
from ciliary.operator.kube import node_certificates as nc
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS


class Response:
    status, reason = 200, "OK"

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = copy.deepcopy(body)

    async def json(self) -> dict[str, Any]:
        return self.body

    def release(self) -> None:
        pass


class FakeCertificates:
    """The CSR subresources as the apiserver keeps them: approval writes conditions, status the rest."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = copy.deepcopy(obj)
        self.calls: list[str] = []

    async def read_certificate_signing_request(self, name: str, **_: Any) -> Response:
        return Response(self.obj)

    async def replace_certificate_signing_request_approval(self, name: str, body: dict[str, Any],
                                                           **_: Any) -> Response:
        self.calls.append("approval")
        self.obj["status"] = {**self.obj.get("status", {}), "conditions": body["status"]["conditions"]}
        return Response(self.obj)

    async def replace_certificate_signing_request_status(self, name: str, body: dict[str, Any],
                                                         **_: Any) -> Response:
        self.calls.append("status")
        self.obj["status"] = copy.deepcopy(body["status"])
        return Response(self.obj)


class FakeCore:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def create_namespaced_event(self, namespace: str, body: dict[str, Any], **_: Any) -> Response:
        self.events.append(body)
        return Response(body)


@pytest.fixture
def make_enroller(tmp_path: Any) -> Any:
    def make(obj: dict[str, Any], etcd_failures: int) -> tuple[enroller_mod.Enroller, FakeCertificates, list[str]]:
        e = enroller_mod.Enroller(SimpleNamespace(), EtcdEndpoint.parse("https://127.0.0.1:1"),
                                  EtcdTLS(tmp_path, tmp_path, tmp_path), make_ca(), agent_service_account=AGENT,
                                  validity=datetime.timedelta(days=1), attempts=3, retry_delay=0.01)
        fake = FakeCertificates(obj)
        e.certificates = fake  # type: ignore[assignment]
        e.core = FakeCore()  # type: ignore[assignment]
        tried: list[str] = []

        async def ensure(name: str, node: str) -> None:
            tried.append(node)
            if len(tried) <= etcd_failures:
                raise enroller_mod.EnrollmentStepError(name, "etcd user", OSError("etcd down"))

        e._ensure_etcd_user = ensure  # type: ignore[method-assign]
        return e, fake, tried

    return make


async def test_an_etcd_outage_is_retried_then_the_certificate_issued(make_enroller: Any) -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    e, fake, tried = make_enroller(csr_obj(request_pem), etcd_failures=2)
    assert await e.handle(fake.obj) == "issued"
    assert tried == ["node-1"] * 3
    assert nc.conditions(fake.obj) == {"Approved": "True"} and fake.obj["status"]["certificate"]
    assert [ev["reason"] for ev in e.core.events] == ["EtcdCertificateIssued"]  # type: ignore[attr-defined]
    # settled now: handled again, nothing is written
    assert await e.handle(fake.obj) == "skipped" and fake.calls == ["approval", "status"]


async def test_retries_are_bounded_and_end_in_failed_without_a_certificate(make_enroller: Any) -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    e, fake, tried = make_enroller(csr_obj(request_pem), etcd_failures=99)
    assert await e.handle(fake.obj) == "failed"
    assert len(tried) == 3
    assert nc.conditions(fake.obj) == {"Failed": "True"} and "certificate" not in fake.obj["status"]
    assert "gave up after 3 attempts" in fake.obj["status"]["conditions"][0]["message"]


async def test_a_request_approved_by_someone_else_is_still_judged(make_enroller: Any) -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-2")  # not node-1's user
    obj = nc.with_condition(csr_obj(request_pem), "Approved", "AdminApproved", "looks fine",
                            datetime.datetime.now(datetime.UTC))
    e, fake, tried = make_enroller(obj, etcd_failures=0)
    assert await e.handle(fake.obj) == "failed"
    assert tried == [] and "certificate" not in fake.obj["status"]
    assert nc.conditions(fake.obj)["Failed"] == "True"


async def test_a_refused_request_is_denied_with_its_reason(make_enroller: Any) -> None:
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    e, fake, tried = make_enroller(csr_obj(request_pem, username="system:serviceaccount:default:x"),
                                   etcd_failures=0)
    assert await e.handle(fake.obj) == "denied" and tried == []
    denied = fake.obj["status"]["conditions"][0]
    assert denied["type"] == "Denied" and "not the agent ServiceAccount" in denied["message"]
    assert e.core.events[0]["type"] == "Warning"  # type: ignore[attr-defined]


class Refused(Response):
    status, reason = 403, "Forbidden"

    async def read(self) -> bytes:
        return b'{"kind":"Status","reason":"Forbidden"}'


async def test_a_refused_write_is_an_error_not_a_success(make_enroller: Any) -> None:
    """Without preloading, the client returns a 403 response as if it were the object: it must raise."""
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    e, fake, _ = make_enroller(csr_obj(request_pem), etcd_failures=0)

    async def refuse(name: str, body: dict[str, Any], **_: Any) -> Response:
        return Refused({})

    fake.replace_certificate_signing_request_status = refuse  # type: ignore[method-assign]
    assert await e.handle(fake.obj) == "failed"  # the Failed condition goes through /status too: refused
    assert "certificate" not in fake.obj["status"]
    assert [ev["reason"] for ev in e.core.events] == []  # type: ignore[attr-defined]


async def test_a_stale_copy_from_the_watch_never_issues_twice(make_enroller: Any) -> None:
    """The watch delivers the MODIFIED event of the approval after the certificate was written: skipped."""
    _, request_pem = nc.new_key_and_request("ciliary-node-node-1")
    e, fake, _ = make_enroller(csr_obj(request_pem), etcd_failures=0)
    stale = copy.deepcopy(fake.obj)
    assert await e.handle(fake.obj) == "issued"
    issued = fake.obj["status"]["certificate"]
    assert await e.handle(nc.with_condition(stale, "Approved", "R", "m", datetime.datetime.now(datetime.UTC))) \
        == "skipped"
    assert fake.obj["status"]["certificate"] == issued and fake.calls == ["approval", "status"]


async def test_a_key_the_signer_cannot_use_is_denied_before_anything_is_written(make_enroller: Any) -> None:
    """An Ed25519 request passes the rule but cannot be signed: Denied, no etcd user, no crash of the enroller."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliary-node-node-1")]))
               .sign(key, None))
    e, fake, tried = make_enroller(csr_obj(request.public_bytes(serialization.Encoding.PEM)), etcd_failures=0)
    assert await e.handle(fake.obj) == "denied" and tried == []
    assert nc.conditions(fake.obj) == {"Denied": "True"} and "certificate" not in fake.obj["status"]
    assert "cannot sign" in fake.obj["status"]["conditions"][0]["message"]
