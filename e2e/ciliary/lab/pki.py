"""The lab's certificate authority and certificates, made with the openssl CLI.

One CA signs the kube-apiserver serving certificate and the client certificates
(admin in group system:masters, the controller manager, the operator, the agents).
A service-account key pair signs and verifies service-account tokens. etcd has a CA of
its own (``pki/etcd/``, see ``etcdsecurity``), so no Kubernetes client certificate is an
etcd identity and the other way round.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from ciliary.lab.nodeconfig import NODE_SERVICES_IP

SERVING_SANS = (
    "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1,"
    # NODE_SERVICES_IP: the chart's components dial the apiserver there without kube-proxy (k8sServiceHost)
    f"IP:{NODE_SERVICES_IP}"
)


class OpensslError(RuntimeError):
    """An openssl command failed; carries its arguments and stderr."""


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OpensslError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def ensure_ca(pki: Path, *, name: str = "ciliary-lab-ca", service_account: bool = True) -> None:
    pki.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (pki / "ca.crt").exists():
        return
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "ca.key"),
        "-out", str(pki / "ca.crt"), "-days", "3650", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    if not service_account:
        return
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def ensure_cert(pki: Path, name: str, subject: str, *, server: bool = False,
                sans: str = SERVING_SANS, client_too: bool = False) -> None:
    """Issue ``<name>.crt``/``<name>.key`` signed by the CA in ``pki`` (once).

    ``server``: a serving certificate for ``sans`` (also usable as a client one with ``client_too``).
    """
    if (pki / f"{name}.crt").exists():
        return
    ext = pki / f"{name}.ext"
    lines = [
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "authorityKeyIdentifier=keyid,issuer",
        "subjectKeyIdentifier=hash",
        ("extendedKeyUsage=serverAuth,clientAuth" if client_too else "extendedKeyUsage=serverAuth")
        if server else "extendedKeyUsage=clientAuth",
    ]
    if server:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / f"{name}.key"),
             "-out", str(pki / f"{name}.csr"), "-subj", subject)
    _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
             # a random serial per certificate, not a shared ca.srl: nodes start side by side and
             # issue their certificates at the same time
             "-CAkey", str(pki / "ca.key"), "-set_serial", hex(secrets.randbits(126) | 1 << 125),
             "-out", str(pki / f"{name}.crt"),
             "-days", "3650", "-extfile", str(ext))
    (pki / f"{name}.csr").unlink()
    ext.unlink()
