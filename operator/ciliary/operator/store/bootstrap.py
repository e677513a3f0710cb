"""``python -m ciliary.operator.store.bootstrap``: create Ciliary's etcd users and roles, then enable auth.

Run as etcd's ``root`` (a client certificate with CN ``root``) once per etcd, before the
components start: the chart runs it as the operator pod's init container. It applies
``access.operator_role()``, ``access.relay_role()`` (the Hubble relay: node records, read only),
``access.reader_role()`` (the command line: reads, never writes) and, with ``--shared-agents``,
``access.shared_agents_role()`` (the chart's agent user when per-node enrollment is off), or ``--node NAME``
roles (one per node, as the lab does), and turns authentication on. Idempotent; etcd not answering yet is retried for a bounded time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import aetcd

from ciliary.operator.store import access, accounts
from ciliary.operator.store.etcdclient import EtcdConfigError, connection_settings, make_client

log = logging.getLogger("ciliary.operator.store.bootstrap")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ciliary-etcd-bootstrap", description=__doc__.splitlines()[0])
    p.add_argument("--etcd-endpoints", default=env("CILIARY_OPERATOR_ETCD_ENDPOINTS", "https://127.0.0.1:2379"))
    p.add_argument("--etcd-ca-file", default=env("CILIARY_ETCD_ROOT_CA_FILE", ""))
    p.add_argument("--etcd-cert-file", default=env("CILIARY_ETCD_ROOT_CERT_FILE", ""),
                   help="etcd root's client certificate (CN root)")
    p.add_argument("--etcd-key-file", default=env("CILIARY_ETCD_ROOT_KEY_FILE", ""))
    p.add_argument("--shared-agents", action="store_true", help="create the shared agent user (chart with etcd.nodeEnrollment.enabled=false)")
    p.add_argument("--node", action="append", default=[], help="create this node's etcd user and role")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for etcd (default 300)")
    return p


async def bootstrap(client: aetcd.Client, *, shared_agents: bool, nodes: Sequence[str]) -> None:
    roles = [access.operator_role(), access.relay_role(), access.reader_role(),
             *([access.shared_agents_role()] if shared_agents else []),
             *(access.node_role(n) for n in nodes)]
    for role in roles:
        await accounts.apply_role(client, role)
    await accounts.enable_auth(client)


async def run(args: argparse.Namespace) -> None:
    endpoints, tls = connection_settings(args.etcd_endpoints, ca_file=args.etcd_ca_file,
                                         cert_file=args.etcd_cert_file, key_file=args.etcd_key_file)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    attempt = 0
    while True:
        client = make_client(endpoints[attempt % len(endpoints)], tls, 10.0)
        try:
            await bootstrap(client, shared_agents=args.shared_agents, nodes=args.node)
            log.info("etcd users and roles in place, authentication on")
            return
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, accounts.EtcdAuthError) as exc:
            if loop.time() > deadline:
                raise
            log.warning("etcd not ready for the bootstrap (%s); retrying", exc)
        finally:
            await client.close()
        attempt += 1
        await asyncio.sleep(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args))
    except EtcdConfigError as exc:
        parser.error(str(exc))
    except (aetcd.ClientError, accounts.EtcdAuthError) as exc:
        log.error("etcd bootstrap failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
