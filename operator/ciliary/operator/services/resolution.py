"""Services + their endpoints -> one :class:`~.intent.NodeLBIntent` per node (pure, deterministic).

For every Service this proxy serves (not headless, not ExternalName, no foreign
``service-proxy-name`` label) and every Service port:

* backends come from the slices of the Service (slices labelled headless are skipped) whose
  ports carry the Service port's name and protocol, at the number the slice gives (named
  target ports resolve per pod); the usable set is the ready endpoints, or, when none is ready,
  the serving-and-terminating ones (independently for the cluster-wide and the node-local set);
* frontends: each ClusterIP (internalTrafficPolicy applies: ``Local`` keeps only this node's
  backends), the NodePort on this node's own address (another node's NodePort is that node's to
  serve: a client here is not translated, its connection goes to that node, which applies its own
  externalTrafficPolicy, as with kube-proxy; Cilium's socket load balancer translates it here), each ExternalIP and
  each LoadBalancer ingress IP. Clients on a node (socket load balancing) use the cluster-wide set
  for these external frontends whatever externalTrafficPolicy says, as kube-proxy does for
  pod-originated traffic; the device programs apply it to clients from outside;
* health checks: a Service with ``externalTrafficPolicy: Local`` and a ``healthCheckNodePort``
  gets, on every node, the number of its distinct ready endpoint addresses on that node (any
  port; kube-proxy counts ready local endpoints too), served by the agent on that port;
* forwarding mode of the external frontends (``FrontendIntent.dsr``): the Service's
  ``service.cilium.io/forwarding-mode`` annotation (``dsr`` or ``snat``), else the operator's
  ``--lb-mode``; any other value is a ``ForwardingModeInvalid`` problem and the default applies
  (a Service keeps working, its Event says which mode it got).

Bad input never spills over: a problem (``errors``) removes only the frontends it concerns and is
listed in every node's intent. Two Services claiming one frontend: the first by namespace/name
keeps it, the other gets ``FrontendConflict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ciliary.operator.services import errors
from ciliary.operator.services.inputs import ServiceInfo, ServicePort, SliceEndpoint, SliceInfo
from ciliary.operator.services.intent import (
    MAX_BACKENDS_PER_FRONTEND,
    PROTOCOL_NUMBERS,
    BackendIntent,
    BackendState,
    FrontendIntent,
    FrontendKind,
    HealthCheckIntent,
    NodeLBIntent,
    ProblemIntent,
)

SERVED_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


LB_MODES = ("snat", "dsr")
"""How clients from outside the cluster reach a backend on another node than the one they came in by."""


@dataclass(frozen=True)
class ResolverConfig:
    node_port_range: tuple[int, int] = (30000, 32767)
    """Inclusive; must match kube-apiserver's --service-node-port-range."""
    max_backends: int = MAX_BACKENDS_PER_FRONTEND
    proxy_name: str = ""
    """This proxy's name: a Service labelled service-proxy-name with another value is not served."""
    lb_mode: str = "snat"
    """How clients from outside reach backends on other nodes (``--lb-mode``): ``snat`` or ``dsr``; a Service's
    ``service.cilium.io/forwarding-mode`` annotation chooses for itself."""


@dataclass(frozen=True)
class LBResolution:
    intents: Mapping[str, NodeLBIntent]
    problems: Mapping[str, tuple[errors.ServiceProblem, ...]] = field(default_factory=dict)
    """Service ``namespace/name`` -> its problems (each becomes a Warning Event)."""


@dataclass(frozen=True, slots=True)
class _Candidate:
    address: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node: str
    pod: str


def served(service: ServiceInfo, config: ResolverConfig) -> bool:
    if service.headless or not service.cluster_ips or service.type not in SERVED_TYPES:
        return False
    return service.proxy_name is None or service.proxy_name == config.proxy_name


def usable(candidates: Iterable[_Candidate]) -> tuple[BackendIntent, ...]:
    """Ready endpoints; when none is ready, the serving-and-terminating ones (kube-proxy's fallback)."""
    pool = list(candidates)
    ready = [c for c in pool if c.ready]
    state = BackendState.READY
    if not ready:
        ready = [c for c in pool if c.serving and c.terminating]
        state = BackendState.TERMINATING
    return tuple(BackendIntent(address=c.address, port=c.port, state=state, node=c.node, pod=c.pod)
                 for c in sorted(ready, key=lambda c: (tuple(int(x) for x in c.address.split(".")), c.port)))


def _candidates(service: ServiceInfo, port: ServicePort, slices: Iterable[SliceInfo]
                ) -> tuple[list[_Candidate], list[str]]:
    """(candidates of ``port``, pods whose slice lacks the port although the Service names it)."""
    found: dict[tuple[str, int], _Candidate] = {}
    unresolved: list[str] = []
    for sl in slices:
        match = next((p for p in sl.ports if p.name == port.name and p.protocol == port.protocol), None)
        if match is None:
            if isinstance(port.target_port, str):
                unresolved += [e.pod or e.addresses[0] for e in sl.endpoints]
            continue
        for ep in sl.endpoints:
            c = _candidate(ep, match.port)
            found.setdefault((c.address, c.port), c)
    return list(found.values()), unresolved


def _candidate(ep: SliceEndpoint, port: int) -> _Candidate:
    return _Candidate(ep.addresses[0], port, ep.ready, ep.serving, ep.terminating, ep.node or "", ep.pod or "")


@dataclass(frozen=True)
class ServiceWants:
    """One Service's share of every node's intent before frontends are shared out between Services: what
    depends on this Service, its slices, the nodes and the config only, so it can be kept while they stay."""

    frontends: Mapping[str, tuple[tuple[str, FrontendIntent], ...]]
    """node -> (Service port label, frontend) in the order the Service asks for them."""
    problems: tuple[errors.ServiceProblem, ...] = ()
    health_checks: Mapping[str, HealthCheckIntent] = field(default_factory=dict)


def wants_of(service: ServiceInfo, slices: list[SliceInfo], nodes: Mapping[str, str | None],
             config: ResolverConfig) -> ServiceWants:
    frontends: dict[str, list[tuple[str, FrontendIntent]]] = {node: [] for node in nodes}
    problems: list[errors.ServiceProblem] = []
    if service.forwarding_mode is not None and service.forwarding_mode.lower() not in LB_MODES:
        problems.append(errors.forwarding_mode_invalid(service.namespace, service.name, service.forwarding_mode,
                                                       config.lb_mode))
    for port in service.ports:
        _resolve_port(frontends, problems, service, port, slices, nodes, config)
    return ServiceWants(frontends={node: tuple(items) for node, items in frontends.items()},
                        problems=tuple(problems), health_checks=_health_checks(service, slices, nodes))


def _resolve_port(frontends: dict[str, list[tuple[str, FrontendIntent]]], problems: list[errors.ServiceProblem],
                  service: ServiceInfo, port: ServicePort, slices: list[SliceInfo], nodes: Mapping[str, str | None],
                  config: ResolverConfig) -> None:
    label = port.name or str(port.port)
    if port.protocol not in PROTOCOL_NUMBERS:
        return
    candidates, unresolved = _candidates(service, port, slices)
    if unresolved:
        problems.append(errors.target_port_unresolved(service.namespace, service.name, label,
                                                      str(port.target_port), unresolved))
    cluster = usable(candidates)
    if len(cluster) > config.max_backends:
        problems.append(errors.too_many_backends(service.namespace, service.name, label, len(cluster),
                                                 config.max_backends))
        return
    external: list[tuple[FrontendKind, str, int]] = []
    if port.node_port and service.type in ("NodePort", "LoadBalancer"):
        low, high = config.node_port_range
        if low <= port.node_port <= high:
            external += [(FrontendKind.NODE_PORT, ip, port.node_port) for _, ip in sorted(nodes.items()) if ip]
        else:
            problems.append(errors.node_port_out_of_range(service.namespace, service.name, label, port.node_port,
                                                          low, high))
    external += [(FrontendKind.EXTERNAL_IP, ip, port.port) for ip in service.external_ips]
    external += [(FrontendKind.LOAD_BALANCER, ip, port.port) for ip in service.load_balancer_ips]
    if external and port.protocol == "SCTP":
        kinds = sorted({str(kind) for kind, _, _ in external})
        problems.append(errors.sctp_from_outside_not_served(service.namespace, service.name, label, kinds))
    common = {"service": service.key, "port_name": port.name, "protocol": port.protocol,
              "affinity_timeout": service.affinity_timeout}
    dsr = forwarding_mode(service, config) == "dsr"
    local_policy = service.internal_traffic_policy == "Local"
    outside = {(kind, ip, number): FrontendIntent(kind=kind, address=ip, port=number, backends=cluster,
                                                  traffic_policy=service.external_traffic_policy,
                                                  source_ranges=service.source_ranges
                                                  if kind == FrontendKind.LOAD_BALANCER else (), dsr=dsr, **common)
               for kind, ip, number in external}
    inside = None if local_policy else [
        FrontendIntent(kind=FrontendKind.CLUSTER_IP, address=ip, port=port.port, backends=cluster,
                       traffic_policy=service.internal_traffic_policy, **common) for ip in service.cluster_ips]
    for node in nodes:
        wanted = inside
        if wanted is None:
            backends = usable(c for c in candidates if c.node == node)
            wanted = [FrontendIntent(kind=FrontendKind.CLUSTER_IP, address=ip, port=port.port, backends=backends,
                                     traffic_policy=service.internal_traffic_policy,
                                     no_local_backends=not backends and bool(cluster), **common)
                      for ip in service.cluster_ips]
        frontends[node] += [(label, fe) for fe in wanted]
        frontends[node] += [(label, fe) for (kind, ip, _), fe in outside.items()
                            if kind != FrontendKind.NODE_PORT or ip == nodes[node]]


def forwarding_mode(service: ServiceInfo, config: ResolverConfig) -> str:
    """``dsr`` or ``snat``: the Service's annotation when it names one, else the operator's ``--lb-mode``."""
    written = (service.forwarding_mode or "").lower()
    return written if written in LB_MODES else config.lb_mode


def _health_checks(service: ServiceInfo, slices: list[SliceInfo],
                   nodes: Mapping[str, str | None]) -> dict[str, HealthCheckIntent]:
    port = service.health_check_node_port
    if not port or service.external_traffic_policy != "Local":
        return {}
    ready = {(ep.node or "", ep.addresses[0]) for sl in slices for ep in sl.endpoints if ep.ready and ep.addresses}
    return {node: HealthCheckIntent(service=service.key, port=port,
                                    local_endpoints=sum(1 for where, _ in ready if where == node))
            for node in nodes}


def conflict(service: ServiceInfo, label: str, fe: FrontendIntent, owner: str) -> errors.ServiceProblem:
    """``service`` asks for a frontend ``owner`` (first by namespace/name) already has."""
    return errors.ServiceProblem(service.namespace, service.name, "FrontendConflict",
                                 f"port {label}: {fe.address}:{fe.port}/{fe.protocol} is already a frontend of "
                                 f"{owner}; not installed for this Service")


def resolve(services: Mapping[str, ServiceInfo], slices: Mapping[str, SliceInfo],
            nodes: Mapping[str, str | None], config: ResolverConfig = ResolverConfig()) -> LBResolution:
    """Every node's load-balancing intent, from scratch. ``nodes``: node name -> its InternalIP (None if unknown).
    The operator's loop keeps the result up to date instead (``incremental_resolution``), equal to this."""
    nodes = dict(sorted(nodes.items()))
    by_service: dict[str, list[SliceInfo]] = {}
    for key in sorted(slices):
        sl = slices[key]
        if not sl.headless:
            by_service.setdefault(sl.service_key, []).append(sl)
    tables: dict[str, dict[tuple[str, int, str], FrontendIntent]] = {node: {} for node in nodes}
    owners: dict[tuple[str, int, str], str] = {}
    conflicts: set[tuple[tuple[str, int, str], str]] = set()  # listed once each, whichever node has the frontend
    health_checks: dict[str, list[HealthCheckIntent]] = {node: [] for node in nodes}
    found: dict[str, list[errors.ServiceProblem]] = {}
    for name in sorted(services):
        service = services[name]
        if not served(service, config):
            continue
        key = service.key
        wants = wants_of(service, by_service.get(key, []), nodes, config)
        mine = list(wants.problems)
        for node, items in wants.frontends.items():
            table = tables[node]
            for label, fe in items:
                owner = owners.setdefault(fe.key, key)
                if owner != key:
                    if (fe.key, key) not in conflicts:
                        conflicts.add((fe.key, key))
                        mine.append(conflict(service, label, fe, owner))
                    continue
                table.setdefault(fe.key, fe)
        for node, hc in wants.health_checks.items():
            health_checks[node].append(hc)
        if mine:
            found[key] = mine
    problems = tuple(ProblemIntent(service=k, reason=p.reason, message=p.message)
                     for k in sorted(found) for p in found[k])
    intents = {node: NodeLBIntent(node=node, frontends=tuple(v for _, v in sorted(tables[node].items())),
                                  problems=problems,
                                  health_checks=tuple(sorted(health_checks[node], key=lambda h: (h.port, h.service))))
               for node in nodes}
    return LBResolution(intents=intents, problems={k: tuple(v) for k, v in found.items()})
