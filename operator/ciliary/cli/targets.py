"""Where the CLI finds etcd and the node agents: flags, then environment, then the local lab.

etcd is reached with mutual TLS: the CA and client certificate come from ``--etcd-ca-file``,
``--etcd-cert-file`` and ``--etcd-key-file``, else ``CILIARY_ETCD_CA_FILE``/``_CERT_FILE``/``_KEY_FILE``,
else etcdctl's ``ETCDCTL_CACERT``/``ETCDCTL_CERT``/``ETCDCTL_KEY``, else the local lab's certificate of
the etcd user ``ciliary-reader`` (``store.access.reader_role``: it reads, it cannot write). Plain ``http://`` only with
``--etcd-insecure`` (or ``CILIARY_ETCD_INSECURE=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliary.cli.errors import UserError
from ciliary.operator.store import access
from ciliary.operator.store.etcdclient import (
    INSECURE_WARNING,
    EtcdConfigError,
    EtcdEndpoint,
    EtcdStore,
    EtcdTLS,
    connection_settings,
)

log = logging.getLogger(__name__)
LAB_ETCD_USER = access.READER_USER
"""The lab certificate the CLI uses (``pki/etcd/<user>.crt``): reads intents, identities and what agents write."""


def lab_config() -> dict[str, object]:
    try:
        data = json.loads((lab_state_dir() / "lab.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lab_state_dir() -> Path:
    return Path(os.environ.get("CILIARY_LAB_DIR", Path.cwd() / ".lab"))


def etcd_endpoint(flag: str | None) -> str:
    """``--etcd-endpoints``, else CILIARY_ETCD_ENDPOINTS, else ETCDCTL_ENDPOINTS, else the lab's etcd."""
    for value in (flag, os.environ.get("CILIARY_ETCD_ENDPOINTS"), os.environ.get("ETCDCTL_ENDPOINTS")):
        if value:
            return value.split(",")[0]
    ports = lab_config().get("ports")
    if isinstance(ports, dict) and ports.get("etcd_client"):
        return f"https://127.0.0.1:{ports['etcd_client']}"
    raise UserError("no etcd to talk to: pass --etcd-endpoints, set CILIARY_ETCD_ENDPOINTS, "
                    "or start the lab (`ciliary lab up`)")


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--etcd-endpoints", help="etcd endpoint (default: CILIARY_ETCD_ENDPOINTS or the lab's)")
    parser.add_argument("--etcd-ca-file", help="CA of etcd's certificate (default: CILIARY_ETCD_CA_FILE, "
                                               "ETCDCTL_CACERT or the lab's)")
    parser.add_argument("--etcd-cert-file", help="client certificate (default: CILIARY_ETCD_CERT_FILE, "
                                                 "ETCDCTL_CERT or the lab's)")
    parser.add_argument("--etcd-key-file", help="client key (default: CILIARY_ETCD_KEY_FILE, ETCDCTL_KEY or the lab's)")
    parser.add_argument("--etcd-insecure", action="store_true",
                        default=os.environ.get("CILIARY_ETCD_INSECURE", "").lower() in ("1", "true", "yes", "on"),
                        help="accept a plain http:// etcd endpoint (no encryption, no authentication)")


def _tls_file(flag: str | None, ciliary_env: str, etcdctl_env: str, lab_file: Path) -> str:
    for value in (flag, os.environ.get(ciliary_env), os.environ.get(etcdctl_env)):
        if value:
            return value
    return str(lab_file) if lab_file.exists() else ""


@dataclass(frozen=True)
class EtcdTarget:
    """The etcd endpoint the CLI talks to and how."""

    endpoint: EtcdEndpoint
    tls: EtcdTLS | None

    def store(self, **kwargs: Any) -> EtcdStore:
        return EtcdStore(self.endpoint, tls=self.tls, **kwargs)


def etcd_target(args: argparse.Namespace) -> EtcdTarget:
    """Resolve the etcd endpoint and credentials from flags, environment and the lab (see module docstring)."""
    endpoint = etcd_endpoint(getattr(args, "etcd_endpoints", None))
    lab_pki = lab_state_dir() / "pki" / "etcd"
    try:
        endpoints, tls = connection_settings(
            endpoint,
            ca_file=_tls_file(getattr(args, "etcd_ca_file", None), "CILIARY_ETCD_CA_FILE", "ETCDCTL_CACERT",
                              lab_pki / "ca.crt"),
            cert_file=_tls_file(getattr(args, "etcd_cert_file", None), "CILIARY_ETCD_CERT_FILE", "ETCDCTL_CERT",
                                lab_pki / f"{LAB_ETCD_USER}.crt"),
            key_file=_tls_file(getattr(args, "etcd_key_file", None), "CILIARY_ETCD_KEY_FILE", "ETCDCTL_KEY",
                               lab_pki / f"{LAB_ETCD_USER}.key"),
            insecure=bool(getattr(args, "etcd_insecure", False)))
    except EtcdConfigError as exc:
        raise UserError(str(exc)) from exc
    if not endpoints[0].secure:
        log.warning(INSECURE_WARNING)
    return EtcdTarget(endpoints[0], tls)
