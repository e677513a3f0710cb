"""``python -m ciliary.nodeagent.enroll``: the agent pod's ``etcd-enroll`` step, which obtains this node's etcd certificate.

Runs as an init container of the agent DaemonSet, the only container of the pod with an API
token (a projected ServiceAccount token, which the kubelet binds to this pod and so to its
node). It

1. generates a fresh P-256 key in memory (``node_certificates.new_key_and_request``), for CN
   ``access.node_user(<node>)``: the etcd user that may read only this node's intent;
2. creates a CertificateSigningRequest (``signerName: ciliary.io/etcd-node``, usages digital
   signature + client auth, name ``ciliary-etcd-<node>-<pod-uid[:8]>-<random>``);
3. waits a bounded time for the enroller (``ciliary.operator.kube.enroller``) to issue it;
4. writes ``tls.key`` and ``tls.crt`` (mode 0600) into the pod's memory-backed emptyDir, which
   the agent container mounts read-only. The key never leaves the pod.

A denied or failed request, or none issued in time, ends it with exit code 1 and a message
saying why (the pod then restarts it with a new key). Each pod start enrolls again. The
CSR objects are left to the kube-controller-manager's CSR cleaner (issued, denied and failed ones
are removed after an hour), so the agent needs no delete permission.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliary.operator.kube import node_certificates
from ciliary.operator.kube.enrollment import SIGNER_NAME
from ciliary.operator.store import access

log = logging.getLogger("ciliary.nodeagent.enroll")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"


class EnrollmentError(RuntimeError):
    """The node did not get its certificate (denied, failed, timed out, refused by the API); carries the CSR."""

    def __init__(self, csr: str, message: str) -> None:
        super().__init__(f"etcd enrollment ({csr or 'no CSR created'}): {message}")
        self.csr = csr


@dataclass(frozen=True)
class ApiAccess:
    """How to reach the Kubernetes API: the server URL, the bearer token and the CA of its certificate."""

    server: str
    token: str
    ca_file: Path

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ApiAccess:
        server = env.get("CILIARY_API_SERVER") or (
            f"https://{env['KUBERNETES_SERVICE_HOST']}:{env.get('KUBERNETES_SERVICE_PORT', '443')}")
        token = Path(env.get("CILIARY_API_TOKEN_FILE", str(SA_DIR / "token"))).read_text().strip()
        return cls(server, token, Path(env.get("CILIARY_API_CA_FILE", str(SA_DIR / "ca.crt"))))

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            result: dict[str, Any] = json.load(response)
            return result


def csr_object(node: str, pod_uid: str, request_pem: bytes) -> dict[str, Any]:
    """The CertificateSigningRequest this pod creates (the server appends a random suffix to the name)."""
    prefix = f"ciliary-etcd-{node[:200]}-{pod_uid[:8]}-".replace("--", "-")
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"generateName": prefix},
            "spec": {"request": base64.b64encode(request_pem).decode(), "signerName": SIGNER_NAME,
                     "usages": list(node_certificates.CLIENT_USAGES)}}


def outcome(obj: Mapping[str, Any]) -> tuple[str, str]:
    """("issued", PEM) / ("denied" | "failed", message) / ("pending", "") for a CSR as read back."""
    status = obj.get("status") or {}
    if status.get("certificate"):
        return "issued", base64.b64decode(status["certificate"]).decode()
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Denied", "Failed") and condition.get("status", "True") == "True":
            return str(condition["type"]).lower(), str(condition.get("message") or condition.get("reason") or "")
    return "pending", ""


def write_credentials(directory: Path, key_pem: bytes, cert_pem: bytes) -> None:
    """``tls.key`` then ``tls.crt``, each 0600 and renamed into place (the agent never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("tls.key", key_pem), ("tls.crt", cert_pem)):
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.replace(directory / name)


def enroll(api: ApiAccess, *, node: str, pod_uid: str, directory: Path, wait_seconds: float,
           common_name: str | None = None, poll: float = 1.0) -> str:
    """Obtain and write this node's etcd certificate; returns the CSR name. Raises :class:`EnrollmentError`.

    ``common_name`` defaults to the node's etcd user; tests pass another to prove it is refused.
    """
    cn = common_name or access.node_user(node)
    key_pem, request_pem = node_certificates.new_key_and_request(cn)
    try:
        created = api.call("POST", CSR_PATH, csr_object(node, pod_uid, request_pem))
    except urllib.error.HTTPError as exc:
        raise EnrollmentError("", f"creating the CertificateSigningRequest was refused: HTTP {exc.code} "
                                  f"{exc.read().decode(errors='replace')[:500]}") from exc
    name = str(created["metadata"]["name"])
    log.info("certificate requested", extra={"csr": name, "cn": cn})
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            state, detail = outcome(api.call("GET", f"{CSR_PATH}/{name}"))
        except urllib.error.HTTPError as exc:
            raise EnrollmentError(name, f"reading the request back was refused: HTTP {exc.code}") from exc
        except OSError as exc:  # the API server restarting: keep waiting within the deadline
            log.warning("reading %s failed: %s", name, exc)
            state, detail = "pending", ""
        if state == "issued":
            write_credentials(directory, key_pem, detail.encode())
            log.info("etcd certificate written", extra={"csr": name, "directory": str(directory)})
            return name
        if state in ("denied", "failed"):
            raise EnrollmentError(name, f"the request was {state}: {detail}")
        if time.monotonic() > deadline:
            raise EnrollmentError(name, f"no certificate after {wait_seconds:.0f} s: is the operator's "
                                        "etcd-enroller running? (kubectl describe csr " + name + ")")
        time.sleep(poll)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ciliary-etcd-enroll", description=__doc__.splitlines()[0])
    p.add_argument("--node", default=env("CILIARY_NODE_NAME", ""), help="this pod's node (downward API)")
    p.add_argument("--pod-uid", default=env("CILIARY_POD_UID", ""), help="this pod's UID (downward API)")
    p.add_argument("--directory", default=env("CILIARY_ENROLL_DIR", "/etc/ciliary/etcd-node"),
                   help="where tls.key and tls.crt are written")
    p.add_argument("--wait", type=float, default=float(env("CILIARY_ENROLL_WAIT_SECONDS", "120")),
                   help="seconds to wait for the certificate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.node or not args.pod_uid:
        parser.error("--node and --pod-uid (CILIARY_NODE_NAME, CILIARY_POD_UID) are required")
    try:
        enroll(ApiAccess.from_environment(os.environ), node=args.node, pod_uid=args.pod_uid,
               directory=Path(args.directory), wait_seconds=args.wait)
    except (EnrollmentError, access.NodeNameError, OSError) as exc:
        print(f"ciliary etcd-enroll: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
