"""``ciliary-agent``: the node agent process.

Start-up order: settings → logging → endpoint registry (loaded from the state dir) →
endpoint API on the unix socket → health (+ flow API) on TCP → the Hubble Observer API (gRPC,
``--hubble-addr``) → etcd registration loop,
and with the datapath enabled (``--datapath``): the enforcer (starts the datapath,
adopting what a previous agent pinned), the intent watcher, the reporter and the flow
pump; with ``--lb-cgroup`` also the socket load balancer (``load_balancing``). SIGTERM or SIGINT stops it: the lease is revoked (the node record and the
reports disappear), the servers close and the socket file is removed; the datapath's
pins and tc filters stay, so enforcement continues until a new agent adopts them
(the same holds after ``kill -9``).
"""

from __future__ import annotations

import os

# The datapath forks (pyroute2's netns helper, ``tc``) from a worker thread while gRPC
# (aetcd) runs its own threads; gRPC's fork handlers then abort the child
# ("Check failed: next_worker->state == KICKED"). The children never use gRPC: disable
# its fork support before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from ciliary.nodeagent import (
    datapath_api,
    dns_service,
    endpoint_api,
    endpoints,
    enforcing,
    envoy_proxy,
    flowapi,
    health,
    load_balancing,
    logs,
    netns_sockets,
    observer_server,
    proxy_plumbing,
    proxy_plumbing_keeper,
    registration,
    reporting,
    settings,
    watching,
)
from ciliary.operator import intents
from ciliary.operator.store.etcdclient import INSECURE_WARNING

log = logging.getLogger("ciliary.nodeagent.main")  # not __name__: "__main__" under python -m


class Agent:
    """The wired-together agent; ``serve`` runs until ``stop`` is set."""

    def __init__(self, config: settings.AgentSettings,
                 datapath_factory: Callable[[settings.AgentSettings], enforcing.DatapathLike] | None = None) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.registry = endpoints.EndpointRegistry(config.state_dir)
        self.registration = registration.NodeRegistration(settings=config, endpoint_count=lambda: len(self.registry))
        self.registry.subscribe(self._on_endpoint_change)
        self.flows = flowapi.FlowHub(config.node_name, capacity=config.flow_buffer_size)
        self.enforcer: enforcing.Enforcer | None = None
        self.watcher: watching.IntentWatcher | None = None
        self.reporter: reporting.Reporter | None = None
        self._indexed: object = None
        self._api: Any = None  # kubernetes_asyncio client, direct status mode only
        self.lb: load_balancing.LoadBalancing | None = None
        self.proxy: envoy_proxy.EnvoyProxy | None = None
        if config.datapath and config.l7_proxy:
            self.proxy = envoy_proxy.EnvoyProxy(
                config.node_name, netns=config.netns, run_dir=config.state_dir / "envoy",
                admin_socket=config.socket_path.parent / "envoy-admin.sock", port=config.proxy_port,
                binary=envoy_proxy.envoy_binary(config.envoy), publish=self.flows.publish)
        self.dns: dns_service.DNSService | None = None
        self.plumbing: proxy_plumbing_keeper.PlumbingKeeper | None = None
        if config.datapath and config.lb_cgroup is not None:
            self.lb = load_balancing.LoadBalancing(
                config.node_name, cgroup=config.lb_cgroup, bpffs=config.bpffs_dir,
                client_factory=self._lb_watch_client, netns=config.netns or None,
                devices=config.lb_devices,
                proxy_healthz=settings.host_port(config.proxy_healthz_addr),
                proxy_status=settings.host_port(config.proxy_status_addr))
            self.flows.set_service_lookup(self.lb.service_of)
        if config.datapath:
            self.datapath = (datapath_factory or make_datapath)(config)
            self.enforcer = enforcing.Enforcer(node=config.node_name, datapath=self.datapath,
                                               registry=self.registry, on_outcome=self._on_outcome)
            dns = self.dns = dns_service.DNSService(config, self.enforcer, self.flows.publish)
            # the DNS service first: a replaced endpoint's learnt addresses are gone before the apply
            self.registry.subscribe(dns.on_endpoint_event)
            self.registry.subscribe(self.enforcer.on_endpoint_event)
            if hasattr(self.datapath, "proxy_ports"):  # the fakes of unit tests have none
                # egress HTTP entries go to Envoy's egress listener; while it does not listen, the
                # kernel finds no socket there and drops them (PROXY_UNAVAILABLE)
                http = {"http": self.proxy.egress_port} if self.proxy is not None else {}
                self.datapath.proxy_ports = {**dns.proxy_ports, **http}
            self.watcher = watching.IntentWatcher(
                node=config.node_name, client_factory=self._watch_client, on_intent=self._on_intent,
                on_invalid=self._on_invalid, on_deleted=self._on_deleted)
            enforcer = self.enforcer
            context = getattr(self.datapath, "context", None)  # the fakes of unit tests have none
            if self.proxy is not None and context is not None:
                device = proxy_plumbing.ProxyDevice(context.proxy_ifindex, context.proxy_mac) \
                    if context.proxy_ifindex else None
                self.plumbing = proxy_plumbing_keeper.PlumbingKeeper(config.netns, config.proxy_port, device)
            self.reporter = reporting.Reporter(node=config.node_name, lease=lambda: self.registration.lease,
                                               client=lambda: self.registration.client,
                                               outcome=lambda: enforcer.outcome, proxy=self.proxy_problem,
                                               egress_proxies=self.egress_proxies)

    async def _on_endpoint_change(self, event: endpoints.EndpointEvent) -> None:
        self.registration.request_update()

    # -- intents in, outcomes out ----------------------------------------------------------

    def _watch_client(self) -> watching.WatchClient:
        endpoint = self.config.etcd_endpoints[self.watcher.reconnects % len(self.config.etcd_endpoints)
                                              if self.watcher else 0]
        return registration.make_client(endpoint, registration.CALL_TIMEOUT_S, self.config.etcd_tls)

    def _lb_watch_client(self) -> watching.WatchClient:
        reconnects = self.lb.watcher.reconnects if self.lb else 0
        endpoint = self.config.etcd_endpoints[reconnects % len(self.config.etcd_endpoints)]
        return registration.make_client(endpoint, registration.CALL_TIMEOUT_S, self.config.etcd_tls)

    async def _on_intent(self, intent: intents.NodeIntent, mod_revision: int) -> None:
        assert self.enforcer is not None
        log.info("Node intent received", extra={"node": self.config.node_name, "revision": intent.revision,
                                                "mod_revision": mod_revision, "endpoints": len(intent.endpoints)})
        if self.dns is not None:
            self.dns.on_intent(intent)
        else:
            self.enforcer.set_intent(intent)

    async def _on_invalid(self, message: str, mod_revision: int) -> None:
        assert self.enforcer is not None
        self.enforcer.set_invalid(message)

    async def _on_deleted(self, mod_revision: int) -> None:
        if mod_revision:
            log.warning("Node intent deleted; the state in force keeps enforcing",
                        extra={"node": self.config.node_name, "mod_revision": mod_revision})

    def egress_proxies(self) -> set[str] | None:
        """The proxy kinds the datapath redirects egress entries to (the others are dropped); None for
        the fakes of unit tests, which have no ``proxy_ports``."""
        ports = getattr(self.datapath, "proxy_ports", None)
        return None if ports is None else set(ports)

    def proxy_problem(self, intent: intents.NodeIntent) -> str:
        """Why this node's Envoy does not enforce the HTTP rules of ``intent`` ("" when it does)."""
        if self.proxy is None:
            return "L7 proxy disabled on this node (--l7-proxy off): HTTP rules are not enforced"
        if self.plumbing is not None and self.plumbing.problems:
            return f"L7 proxy plumbing: {'; '.join(self.plumbing.problems)}"
        return self.proxy.problem(intent)

    def _on_outcome(self, outcome: enforcing.Outcome) -> None:
        if outcome.applied is not self._indexed:
            self._indexed = outcome.applied
            self.flows.set_intent(outcome.applied)
            if self.proxy is not None:
                self.proxy.set_intent(outcome.applied)
        if self.reporter is not None:
            self.reporter.poke()

    def enforcement(self) -> dict[str, object]:
        """``GET /v1/enforcement``: where enforcement stands (for tests, ``ciliary`` and humans)."""
        if self.enforcer is None:
            return {"node": self.config.node_name, "datapath": False}
        o = self.enforcer.outcome
        return {"node": self.config.node_name, "datapath": True, "started": o.started,
                "applied_revision": o.applied.revision if o.applied else None,
                "wanted_revision": o.wanted.revision if o.wanted else None,
                "error": o.error, "error_kind": o.error_kind, "applies": o.applies,
                "kernel_endpoints": dict(o.kernel_endpoints) if o.kernel_endpoints is not None else None,
                "datapath_problems": list(o.datapath_problems),
                "last_compiled": list(o.last_compiled), "last_map_writes": o.last_map_writes,
                "last_attached": o.last_attached, "endpoints": o.endpoints, "unplaced": list(o.unplaced),
                "program_hashes": dict(o.program_hashes), "load_balancing": self.lb_status(),
                "l7_proxy": self.proxy.status() if self.proxy is not None else None,
                "proxies": dict(o.proxy_problems)}

    def lb_status(self) -> dict[str, object] | None:
        """The socket load balancer's state (None: not configured, no --lb-cgroup)."""
        if self.lb is None:
            return None
        return {"started": self.lb.started.is_set(), "error": self.lb.error, "applies": self.lb.applies,
                "devices": [d.name for d in self.lb.devices.devices] if self.lb.devices else [],
                "devices_error": self.lb.devices_error,
                "in_sync": self.lb.applied is not None and self.lb.applied == self.lb.wanted}

    def health_view(self) -> health.EnforcementView:
        """Enforcement as /healthz and /readyz judge it."""
        if self.enforcer is None or self.watcher is None:
            return health.EnforcementView(datapath=False)
        o = self.enforcer.outcome
        broken = self.watcher.broken_since
        return health.EnforcementView(
            datapath=True, started=o.started, start_error="" if o.started else o.error,
            datapath_problems=tuple(o.datapath_problems), watch_synced=self.watcher.synced,
            watch_broken_for=None if broken is None else time.monotonic() - broken,
            wanted_revision=o.wanted.revision if o.wanted else None,
            applied_revision=o.applied.revision if o.applied else None,
            apply_error=o.error if o.started else "",
            lb_not_started=(self.lb.error or "not attached yet") if self.lb and not self.lb.started.is_set() else "")

    def _routes(self, app: web.Application) -> None:
        async def enforcement(_request: web.Request) -> web.Response:
            return web.json_response(self.enforcement())

        async def dns(_request: web.Request) -> web.Response:
            return web.json_response(self.dns.view() if self.dns is not None else {"port": 0, "running": False})

        app.router.add_get("/v1/enforcement", enforcement)
        app.router.add_get("/v1/dns", dns)

    async def _run_flows(self) -> None:
        """Once the datapath runs: attach its flow reader to the loop and pump events into the hub."""
        assert self.enforcer is not None
        await self.enforcer.started.wait()
        reader = await self.enforcer.call(self.datapath.flows)
        reader.attach(asyncio.get_running_loop(), on_batch=self.flows.publish)
        self.flows.rules_for = self.datapath.rules_for
        try:
            await self.flows.pump(reader, self.stop)
        finally:
            reader.detach()

    async def serve(self) -> None:
        self.registry.load()
        if self.config.datapath:
            # pyroute2's IPRoute runs its own event loop: build the check in a worker thread
            present = await asyncio.get_running_loop().run_in_executor(None, host_veth_present, self.config.netns)
            await self.registry.forget_missing(present)
            # pods registered by a CNI plugin older than the namespace cookie: read it now, before the first apply
            directory = self.config.pod_netns_dir
            await asyncio.get_running_loop().run_in_executor(None, self.registry.learn_cookies, lambda e: (
                netns_sockets.netns_cookie(endpoints.pod_netns_path(e.netns, directory))))
        runners: list[web.AppRunner] = []
        hubble_server: Any = None
        reg_task: asyncio.Task[None] | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            if not self.config.datapath:
                log.warning("Datapath off (tests only): this agent enforces nothing and refuses every endpoint",
                            extra={"node": self.config.node_name})
            runners.append(await endpoint_api.start(self.registry, self.config.socket_path,
                                                    enforcing=self.config.datapath))
            runners.append(await health.start(
                health.HealthSources(self.config.node_name, self.registration, self.registry,
                                     enforcement=self.health_view),
                self.config.health_host, self.config.health_port,
                routes=[flowapi.add_routes(self.flows), self._routes,
                        datapath_api.add_routes(self.config.node_name, self.enforcer,
                                                getattr(self, "datapath", None), self.registry),
                        load_balancing.add_routes(self.config.node_name, self.lb)],
            ))
            if self.config.hubble_addr:
                try:
                    hubble_server = await observer_server.start(
                        self.flows, self.config.hubble_addr, tls=self.config.hubble_tls,
                        insecure=self.config.hubble_insecure, socket=self.config.hubble_socket)
                except OSError as exc:  # observability only: enforcement goes on without it
                    log.error("Hubble Observer API not served", extra={"address": self.config.hubble_addr,
                                                                       "error": str(exc)})
            reg_task = asyncio.create_task(self.registration.run(self.stop), name="registration")
            if self.config.direct_status and self.reporter is not None:
                from ciliary.nodeagent import direct_status  # kubernetes_asyncio: direct mode only
                from ciliary.operator.kube import kubeapi

                self._api = await kubeapi.api_client(self.config.kubeconfig or None)
                self.reporter.direct = direct_status.DirectStatusWriter(self._api, self.config.node_name)
            if self.enforcer is not None and self.watcher is not None and self.reporter is not None:
                tasks = [asyncio.create_task(self.enforcer.run(self.stop), name="enforcer"),
                         asyncio.create_task(self.watcher.run(self.stop), name="watcher"),
                         asyncio.create_task(self.reporter.run(self.stop), name="reporter"),
                         asyncio.create_task(self._run_flows(), name="flows")]
                if self.dns is not None:
                    tasks.append(asyncio.create_task(self.dns.run(self.stop), name="dns"))
            if self.lb is not None:
                tasks.append(asyncio.create_task(self.lb.run(self.stop), name="load-balancing"))
            if self.proxy is not None:
                tasks.append(asyncio.create_task(self.proxy.run(self.stop), name="l7-proxy"))
            if self.plumbing is not None:
                tasks.append(asyncio.create_task(self.plumbing.run(self.stop), name="l7-plumbing"))
            log.info("Agent started", extra={"node": self.config.node_name, "pid": os.getpid(),
                                             "datapath": self.config.datapath})
            stop_task = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([stop_task, reg_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if not self.stop.is_set():
                for task in (reg_task, *tasks):
                    if task.done():
                        log.error("Agent loop ended unexpectedly", extra={"task": task.get_name()})
                        task.result()  # re-raise an unexpected crash of a loop
        finally:
            log.info("Agent stopping", extra={"node": self.config.node_name})
            self.stop.set()
            if self._api is not None:
                await self._api.close()
            for task in [t for t in (reg_task, *tasks) if t is not None]:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 5)
                task.cancel()
            await asyncio.gather(*[t for t in (reg_task, *tasks) if t is not None], return_exceptions=True)
            if self.enforcer is not None:
                await self.enforcer.close()
            if self.lb is not None:
                await self.lb.close()
            await self.registration.close()
            if hubble_server is not None:
                await hubble_server.stop(grace=1)
            for runner in reversed(runners):
                await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                endpoint_api.remove_stale_socket(self.config.socket_path)
            log.info("Agent stopped", extra={"node": self.config.node_name})


def host_veth_present(netns: str) -> Callable[[endpoints.Endpoint], bool]:
    """Whether an endpoint's host veth still exists (same name and ifindex) in the node's namespace."""
    from pyroute2 import IPRoute

    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        links = {(str(link.get_attr("IFLA_IFNAME")), int(link["index"])) for link in ipr.get_links()}
    finally:
        ipr.close()
    return lambda endpoint: (endpoint.host_ifname, endpoint.host_ifindex) in links


def make_datapath(config: settings.AgentSettings) -> enforcing.DatapathLike:
    """The eBPF datapath, pinning under ``<bpffs-dir>/ciliary/<node>/`` (libbpf; bcc runs in a compiler child).

    With the L7 proxy on, the proxy device is set up first (``proxy_plumbing``) and rendered into
    the programs; if that fails, packets that HTTP rules would redirect are dropped (logged, and
    every policy with HTTP rules reports not enforcing on this node). With it off, whatever an
    earlier run set up is removed.
    """
    from ciliary.nodeagent import rendering
    from ciliary.nodeagent.datapath import engine

    pin_dir = config.bpffs_dir / "ciliary" / config.node_name
    trace_all, trace_flags = config.monitor_aggregation == "none", config.monitor_aggregation == "medium"
    interval = config.monitor_aggregation_interval
    context = rendering.RenderContext(pin_dir=str(pin_dir), trace_all=trace_all, trace_flags=trace_flags,
                                      trace_interval_s=interval)
    proxy_plumbing.SYSCTL_NET_DIR = config.sysctl_net_dir
    if config.l7_proxy:
        try:
            # pyroute2's sync API runs its own event loop: never inside the agent's running one
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                device = pool.submit(proxy_plumbing.ensure, config.netns, config.proxy_port).result()
            context = rendering.RenderContext(pin_dir=str(pin_dir), proxy_ifindex=device.ifindex,
                                              proxy_mac=device.mac, trace_all=trace_all, trace_flags=trace_flags,
                                              trace_interval_s=interval)
        except (proxy_plumbing.PlumbingFailed, OSError, subprocess.SubprocessError) as exc:
            log.error("No proxy device: traffic that HTTP rules redirect is dropped",
                      extra={"node": config.node_name, "error": str(exc)})
    else:
        try:  # an earlier run with the proxy on left its device, rules and sysctl behind
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(proxy_plumbing.teardown, config.netns).result()
        except (proxy_plumbing.PlumbingFailed, OSError, subprocess.SubprocessError) as exc:
            log.error("Could not remove the L7 proxy plumbing", extra={"node": config.node_name, "error": str(exc)})
    return engine.Datapath(config.node_name, netns=config.netns or None, bpffs=config.bpffs_dir, context=context)


async def run_agent(config: settings.AgentSettings) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    pid = os.getpid()

    # Not loop.add_signal_handler: its wakeup fd is inherited by the children the datapath
    # forks (pyroute2's netns helper), and a SIGTERM to such a child would stop the agent.
    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != pid:  # a forked child: behave as if no handler was installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        loop.call_soon_threadsafe(agent.stop.set)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    await agent.serve()


def main(argv: Sequence[str] | None = None) -> None:
    config = settings.load_settings(argv, os.environ)
    logs.configure_logging(config.log_level)
    log.info("Settings", extra={
        "node": config.node_name, "etcd": ",".join(map(str, config.etcd_endpoints)),
        "socket": str(config.socket_path), "state_dir": str(config.state_dir),
        "health": config.health_addr, "lease_ttl": config.lease_ttl,
        "datapath": config.datapath, "netns": config.netns, "bpffs_dir": str(config.bpffs_dir),
        "etcd_tls": config.etcd_tls is not None, "hubble": config.hubble_addr,
        "hubble_tls": config.hubble_tls is not None, "hubble_socket": config.hubble_socket,
    })
    if config.etcd_insecure:
        log.warning(INSECURE_WARNING, extra={"node": config.node_name})
    try:
        asyncio.run(run_agent(config))
    except OSError as exc:
        log.error("Agent failed", extra={"error": str(exc)})
        sys.exit(1)


if __name__ == "__main__":
    main()
