"""``ciliary-operator``: the central operator process.

Runs kopf (watch handlers only) next to the reconcile loop that publishes one
NodeIntent per node into etcd. Flags (each also as ``CILIARY_OPERATOR_*``):
``--kubeconfig``, ``--etcd-endpoints`` (https, with ``--etcd-ca-file``, ``--etcd-cert-file``,
``--etcd-key-file``; plain http only with ``--etcd-insecure``), ``--identity-gc-grace``, ``--log-level``,
``--[no-]enable-k8s-event-handover`` (default on: the operator writes ``.status.nodes``
from the agents' reports in etcd; off: agents patch it themselves and the operator
writes only the conditions) and ``--status-interval`` (seconds between two status
writes of one policy, default 1). Load balancing (Services -> per-node LB intents, ``lb_reconciling``):
``--endpoints-api endpointslices|endpoints``, ``--node-port-range LOW-HIGH``, ``--lb-mode snat|dsr``,
``--service-proxy-name``; with it,
LB IPAM (CiliumLoadBalancerIPPools -> LoadBalancer Services' IPs, ``lb_ipam_reconciling``).
Prometheus metrics (``operator_metrics``) on ``GET /metrics`` of ``--prometheus-serve-addr`` (default off; a
taken address is logged and the operator goes on without them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import kopf
import prometheus_client
from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException

from ciliary.operator import operator_metrics
from ciliary.operator.kube import handlers, kubeapi, service_handlers
from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.kube.service_events import ServiceEventPoster
from ciliary.operator.kube.service_model import ServiceModel
from ciliary.operator.lb_ipam_reconciling import LBIPAMReconciler, PoolModel
from ciliary.operator.lb_ipam_reconciling import initial_list as lb_ipam_initial_list
from ciliary.operator.lb_reconciling import LBReconciler
from ciliary.operator.reconciling import Reconciler
from ciliary.operator.services.resolution import LB_MODES, ResolverConfig
from ciliary.operator.status.handover import StatusHandover
from ciliary.operator.status.tls_events import TlsProblemReporter
from ciliary.operator.store import leadership
from ciliary.operator.store.etcdclient import (
    INSECURE_WARNING,
    EtcdConfigError,
    EtcdStore,
    FenceLostError,
    connection_settings,
)
from ciliary.operator.store.identities import EtcdIdentityAllocator
from ciliary.operator.store.lb_publishing import LBIntentPublisher
from ciliary.operator.store.publishing import IntentPublisher

log = logging.getLogger("ciliary.operator")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="ciliary-operator",
        description="Ciliary operator: validates CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects, "
                    "resolves them into one intent per node and publishes the intents into etcd.")
    p.add_argument("--kubeconfig", default=env("CILIARY_OPERATOR_KUBECONFIG", env("KUBECONFIG", "")),
                   help="kubeconfig file (default: in-cluster service account)")
    p.add_argument("--etcd-endpoints", default=env("CILIARY_OPERATOR_ETCD_ENDPOINTS", "https://127.0.0.1:2379"),
                   help="etcd endpoints, comma-separated, e.g. https://10.0.0.1:2379,https://10.0.0.2:2379 "
                        "(the first is used; on a connection failure the next one)")
    p.add_argument("--etcd-ca-file", default=env("CILIARY_OPERATOR_ETCD_CA_FILE", ""),
                   help="CA certificate that signed etcd's serving certificate")
    p.add_argument("--etcd-cert-file", default=env("CILIARY_OPERATOR_ETCD_CERT_FILE", ""),
                   help="client certificate for etcd (its CN is the operator's etcd user)")
    p.add_argument("--etcd-key-file", default=env("CILIARY_OPERATOR_ETCD_KEY_FILE", ""),
                   help="private key of --etcd-cert-file")
    p.add_argument("--etcd-insecure", action=argparse.BooleanOptionalAction,
                   default=_env_bool("CILIARY_OPERATOR_ETCD_INSECURE", False),
                   help="accept plain http:// etcd endpoints (no encryption, no authentication; tests only)")
    p.add_argument("--identity-gc-grace", type=float,
                   default=float(env("CILIARY_OPERATOR_IDENTITY_GC_GRACE", "300")),
                   help="seconds an unused identity is kept before it is deleted (default 300)")
    p.add_argument("--enable-k8s-event-handover", action=argparse.BooleanOptionalAction,
                   default=_env_bool("CILIARY_OPERATOR_ENABLE_K8S_EVENT_HANDOVER", True),
                   help="write each policy's .status.nodes from the agents' reports in etcd (default); "
                        "with --no-enable-k8s-event-handover agents write it and the operator only the conditions")
    p.add_argument("--status-interval", type=float,
                   default=float(env("CILIARY_OPERATOR_STATUS_INTERVAL", "1")),
                   help="at most one status write per policy per this many seconds (default 1)")
    p.add_argument("--leader-election", action=argparse.BooleanOptionalAction,
                   default=_env_bool("CILIARY_OPERATOR_LEADER_ELECTION", False),
                   help="run as one of several replicas: only the elected leader (an etcd key bound to its "
                        "lease) works, the others wait to take over")
    p.add_argument("--leader-key", default=env("CILIARY_OPERATOR_LEADER_KEY", leadership.DEFAULT_KEY),
                   help=f"etcd key of the election (default {leadership.DEFAULT_KEY})")
    p.add_argument("--leader-id", default=env("CILIARY_OPERATOR_LEADER_ID", ""),
                   help="this replica's name in the election (default: host name and pid)")
    p.add_argument("--leader-lease-ttl", type=int, default=int(env("CILIARY_OPERATOR_LEADER_LEASE_TTL", "15")),
                   help="seconds after which a silent leader loses the election (default 15)")
    p.add_argument("--endpoints-api", choices=service_handlers.ENDPOINT_APIS,
                   default=env("CILIARY_OPERATOR_ENDPOINTS_API", "endpointslices"),
                   help="where Service backends come from: discovery.k8s.io/v1 EndpointSlices (default) or "
                        "v1 Endpoints (clusters without the EndpointSlice API)")
    p.add_argument("--node-port-range", type=_port_range, default=env("CILIARY_OPERATOR_NODE_PORT_RANGE",
                                                                        "30000-32767"),
                   help="NodePorts served, LOW-HIGH (must match kube-apiserver's --service-node-port-range)")
    p.add_argument("--lb-mode", choices=LB_MODES, default=env("CILIARY_OPERATOR_LB_MODE", "snat"),
                   help="how clients from outside the cluster reach a backend on another node: snat (the "
                        "default; the backend sees the node, replies return through it) or dsr (direct server "
                        "return: the backend sees the client and its node answers it); a Service's annotation "
                        "service.cilium.io/forwarding-mode chooses for itself")
    p.add_argument("--service-proxy-name", default=env("CILIARY_OPERATOR_SERVICE_PROXY_NAME", ""),
                   help="Services labelled service.kubernetes.io/service-proxy-name with another value are "
                        "left to that proxy")
    p.add_argument("--prometheus-serve-addr", default=env("CILIARY_OPERATOR_PROMETHEUS_SERVE_ADDR", "off"),
                   metavar="HOST:PORT", help="serve Prometheus metrics on GET /metrics here (Cilium's operator "
                                             "port is 9963); off: not served (default)")
    p.add_argument("--load-balancing", action=argparse.BooleanOptionalAction,
                   default=_env_bool("CILIARY_OPERATOR_LOAD_BALANCING", True),
                   help="resolve Services and EndpointSlices into per-node load-balancing intents (default on; "
                        "off when another proxy, e.g. kube-proxy, serves Services)")
    p.add_argument("--log-level", default=env("CILIARY_OPERATOR_LOG_LEVEL", "INFO"), help="log level")
    return p


def _metrics_address(text: str) -> str:
    value = text.strip()
    if value.lower() in ("", "off"):
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--prometheus-serve-addr {text!r} is not HOST:PORT or off")
    return value


async def serve_metrics(registry: prometheus_client.CollectorRegistry, address: str) -> web.AppRunner | None:
    """``GET /metrics`` on ``address``; None (logged) when it cannot listen: metrics never stop the operator."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(registry),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = address.rpartition(":")
    try:
        await web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port)).start()
    except OSError as exc:
        log.error("Prometheus metrics not served", extra={"address": address, "error": str(exc)})
        await runner.cleanup()
        return None
    log.info("Prometheus metrics serving", extra={"address": address})
    return runner


def _port_range(text: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(text, tuple):
        return text
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH") from None
    if not sep or not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range LOW-HIGH")
    return lo, hi


def _env_bool(name: str, default: bool) -> bool:
    """A boolean from the environment; a word that is neither true nor false stops the operator naming the
    variable (taking it for false would, for example, turn the status handover off without a word)."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"ciliary-operator: {name}={value!r} is neither true nor false")


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    first, *others = args.etcd[0]
    store = EtcdStore(first, tls=args.etcd[1], fallbacks=others)
    leader: leadership.Leadership | None = None
    if args.leader_election:
        leader = leadership.Leadership(store, key=args.leader_key, identity=args.leader_id,
                                       ttl=args.leader_lease_ttl)
        if not await leader.acquire(stop):
            await store.close()
            return
    allocator = EtcdIdentityAllocator(store, grace_seconds=args.identity_gc_grace)
    publisher = IntentPublisher(store)
    lb_publisher = LBIntentPublisher(store)
    await allocator.load()
    await publisher.load()
    await lb_publisher.load()
    if not args.load_balancing:
        await lb_publisher.withdraw_all()
    api = await kubeapi.api_client(args.kubeconfig or None)
    model = ClusterModel()
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(model, allocator, publisher, fetch_secret=kubeapi.secret_reader(api))
    handover = StatusHandover(store, api, interval=args.status_interval,
                              write_nodes=args.enable_k8s_event_handover,
                              node_names=lambda: model.nodes.keys(),
                              resolved_generation=reconciler.resolved_generation,
                              intents_revision=lambda: reconciler.intents_revision,
                              wait_for=[reconciler.synced], require_assessment=True)
    reconciler.report_tls = TlsProblemReporter(handover, api)
    handlers.register(registry, model, handover)
    services = ServiceModel()
    pools = PoolModel()
    if args.load_balancing:
        service_handlers.register(registry, services, args.endpoints_api, pools)
    ipam = LBIPAMReconciler(services, pools, api)
    lb = LBReconciler(services, lambda: {name: node.ipv4 for name, node in model.nodes.items()}, lb_publisher,
                      ServiceEventPoster(api), ResolverConfig(node_port_range=_port_range(args.node_port_range),
                                                              proxy_name=args.service_proxy_name,
                                                              lb_mode=args.lb_mode))
    metrics_runner = None
    if args.prometheus_serve_addr:
        metrics = prometheus_client.CollectorRegistry(auto_describe=False)
        metrics.register(operator_metrics.OperatorMetrics(
            {"policy": lambda: reconciler.loop_stats, "lb": lambda: lb.loop_stats}, handover.metrics_view(),
            identities=lambda: len(allocator.canonical_of), nodes=lambda: len(model.nodes)))
        metrics_runner = await serve_metrics(metrics, args.prometheus_serve_addr)
    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    await list_with_retries(api, model, handover)
    handover.policies_listed.set()
    if args.load_balancing:
        await service_handlers.initial_list(api, services, args.endpoints_api)
        await lb_ipam_initial_list(api, pools)
    listed = asyncio.Event()
    listed.set()
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(kopf.operator(registry=registry, settings=settings, standalone=True,
                                          clusterwide=True, stop_flag=stop), name="kopf"),
        asyncio.create_task(reconciler.run(listed), name="reconciler"),
        asyncio.create_task(handover.run(), name="handover"),
    ]
    if args.load_balancing:
        tasks.append(asyncio.create_task(lb.run(listed), name="lb-reconciler"))
        tasks.append(asyncio.create_task(ipam.run(listed), name="lb-ipam"))
    if leader is not None:
        async def stop_when_lost(lost: asyncio.Event) -> None:
            await lost.wait()
            stop.set()  # another replica may lead now: stop acting at once

        tasks += [asyncio.create_task(leader.keep(stop), name="leadership"),
                  asyncio.create_task(stop_when_lost(leader.lost), name="leadership-lost")]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task not in done:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await api.close()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    if leader is not None:
        if leader.lost.is_set():
            await store.close()
            raise leadership.LeadershipLostError(leader.identity)
        await leader.release()
    await store.close()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]


async def list_with_retries(api: Any, model: ClusterModel, observer: handlers.PolicyObserver, *,
                            attempts: int = 30) -> None:
    """The apiserver may still be starting (429 while storage initialises, CRDs not yet served)."""
    for attempt in range(1, attempts + 1):
        try:
            await handlers.initial_list(api, model, observer)
            return
        except ApiException as exc:
            if attempt == attempts or exc.status not in (404, 429, 500, 503):
                raise
            log.warning("initial listing failed (%s %s), retrying (%d/%d)", exc.status, exc.reason, attempt,
                        attempts)
            await asyncio.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # an environment default escapes argparse's choices
        if action.choices is not None and getattr(args, action.dest, None) not in action.choices:
            parser.error(f"{action.option_strings[0]}: {getattr(args, action.dest)!r} (from the environment) is not "
                         f"one of {', '.join(map(str, action.choices))}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    try:
        args.prometheus_serve_addr = _metrics_address(args.prometheus_serve_addr)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    try:
        args.etcd = connection_settings(args.etcd_endpoints, ca_file=args.etcd_ca_file,
                                        cert_file=args.etcd_cert_file, key_file=args.etcd_key_file,
                                        insecure=args.etcd_insecure)
    except EtcdConfigError as exc:
        parser.error(str(exc))
    if args.etcd_insecure:
        log.warning(INSECURE_WARNING)

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(args, stop)

    try:
        asyncio.run(amain())
    except (leadership.LeadershipLostError, FenceLostError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
