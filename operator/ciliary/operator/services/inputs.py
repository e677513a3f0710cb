"""The cluster facts load-balancing resolution reads: Services and their endpoints, parsed once at the edge.

:func:`service_from_body` parses a v1 Service, :func:`slice_from_body` a discovery.k8s.io/v1
EndpointSlice and :func:`slices_from_endpoints` a v1 Endpoints object (the fallback when the
EndpointSlice API is absent or switched off: each subset becomes one slice-shaped value, its
``notReadyAddresses`` not ready and not serving). Only IPv4 is kept (the datapath is IPv4-only).

Named target ports need no pod lookup here: the EndpointSlice (and Endpoints) controller resolves a
``targetPort`` name per pod and groups pods by the numbers they resolved to, so one Service port can
map to different numbers on different pods; a pod that declares no such port sits in a slice whose
ports lack that Service port's name (``resolution`` reports it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
FORWARDING_MODE_ANNOTATION = "service.cilium.io/forwarding-mode"
DEFAULT_AFFINITY_TIMEOUT = 10800
"""Seconds: Kubernetes' default ``sessionAffinityConfig.clientIP.timeoutSeconds``."""


def _ipv4(value: Any) -> str | None:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One ``spec.ports`` item."""

    name: str
    protocol: str
    port: int
    target_port: int | str
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What load balancing needs of one Service."""

    namespace: str
    name: str
    uid: str = ""
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    """IPv4 cluster IPs; empty for a headless Service."""
    headless: bool = False
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    """``status.loadBalancer.ingress[].ip``."""
    internal_traffic_policy: str = "Cluster"
    external_traffic_policy: str = "Cluster"
    health_check_node_port: int | None = None
    """``spec.healthCheckNodePort`` (allocated for ``externalTrafficPolicy: Local`` load balancers)."""
    affinity_timeout: int = 0
    """Seconds of ClientIP session affinity; 0: no affinity."""
    proxy_name: str | None = None
    """The ``service-proxy-name`` label: a Service carrying it belongs to another proxy."""
    source_ranges: tuple[str, ...] = ()
    """``spec.loadBalancerSourceRanges`` (or, when empty, the legacy annotation
    ``service.beta.kubernetes.io/load-balancer-source-ranges``) of a LoadBalancer Service, as
    normalised CIDRs (IPv4 and IPv6): only these clients may use its load balancer IPs."""
    forwarding_mode: str | None = None
    """The ``service.cilium.io/forwarding-mode`` annotation as written (``dsr``, ``snat``, or anything else,
    which resolution reports); None: the operator's ``--lb-mode`` applies."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One endpoint of a slice (its IPv4 addresses) with the conditions Kubernetes defines."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node: str | None = None
    pod: str | None = None
    """``namespace/name`` of the pod behind it (targetRef), if any."""


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """An EndpointSlice (or one subset of a v1 Endpoints object) of a Service."""

    namespace: str
    name: str
    service: str
    """Name of the Service it belongs to (``kubernetes.io/service-name``)."""
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()
    headless: bool = False
    """Labelled ``service.kubernetes.io/headless``: not proxied."""

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"


def service_from_body(body: Mapping[str, Any]) -> ServiceInfo:
    meta, spec = body.get("metadata", {}) or {}, body.get("spec", {}) or {}
    status = body.get("status", {}) or {}
    labels = meta.get("labels") or {}
    raw_ips = list(spec.get("clusterIPs") or []) or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    # kube-proxy serves neither a Service without a ClusterIP nor one labelled service.kubernetes.io/headless (the
    # EndpointSlice controller drops that label from the slices of a Service with a ClusterIP: read it here)
    headless = any(str(ip) == "None" for ip in raw_ips) or HEADLESS_LABEL in labels
    ports = tuple(
        ServicePort(name=str(p.get("name") or ""), protocol=str(p.get("protocol") or "TCP").upper(),
                    port=int(p["port"]),
                    target_port=_target(p.get("targetPort"), int(p["port"])),
                    node_port=int(p["nodePort"]) if p.get("nodePort") else None)
        for p in spec.get("ports") or [])
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        affinity = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
    lb_ips = tuple(ip for i in ((status.get("loadBalancer") or {}).get("ingress") or [])
                   if (ip := _ipv4(i.get("ip"))) is not None)
    return ServiceInfo(
        namespace=str(meta.get("namespace") or "default"), name=str(meta["name"]), uid=str(meta.get("uid") or ""),
        type=str(spec.get("type") or "ClusterIP"),
        cluster_ips=() if headless else tuple(ip for raw in raw_ips if (ip := _ipv4(raw)) is not None),
        headless=headless, ports=ports,
        external_ips=tuple(ip for raw in spec.get("externalIPs") or [] if (ip := _ipv4(raw)) is not None),
        load_balancer_ips=lb_ips if spec.get("type") == "LoadBalancer" else (),
        internal_traffic_policy=str(spec.get("internalTrafficPolicy") or "Cluster"),
        external_traffic_policy=str(spec.get("externalTrafficPolicy") or "Cluster"),
        health_check_node_port=int(spec["healthCheckNodePort"]) if spec.get("healthCheckNodePort") else None,
        affinity_timeout=affinity,
        proxy_name=str(labels[PROXY_NAME_LABEL]) if PROXY_NAME_LABEL in labels else None,
        source_ranges=_source_ranges(spec, meta.get("annotations") or {}) if spec.get("type") == "LoadBalancer"
        else (),
        forwarding_mode=(str((meta.get("annotations") or {})[FORWARDING_MODE_ANNOTATION]).strip()
                         if FORWARDING_MODE_ANNOTATION in (meta.get("annotations") or {}) else None),
    )


SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"


def _source_ranges(spec: Mapping[str, Any], annotations: Mapping[str, Any]) -> tuple[str, ...]:
    """The field wins; the annotation (comma-separated) counts only without it, as in kube-proxy.
    The apiserver validates both as CIDRs; an entry that still does not parse is left out."""
    raw = list(spec.get("loadBalancerSourceRanges") or [])
    if not raw:
        raw = [part for part in str(annotations.get(SOURCE_RANGES_ANNOTATION) or "").split(",") if part.strip()]
    ranges = []
    for item in raw:
        try:
            ranges.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(ranges))


def _target(value: Any, port: int) -> int | str:
    if value is None or value == "" or value == 0:
        return port
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text) if text.isdigit() else text


def _conditions(raw: Mapping[str, Any] | None) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating) with Kubernetes' defaults for unset fields."""
    raw = raw or {}
    ready = raw.get("ready")
    ready = True if ready is None else bool(ready)
    serving = raw.get("serving")
    serving = ready if serving is None else bool(serving)
    return ready, serving, bool(raw.get("terminating"))


def _pod_ref(ref: Mapping[str, Any] | None, namespace: str) -> str | None:
    if not ref or ref.get("kind") != "Pod":
        return None
    return f"{ref.get('namespace') or namespace}/{ref.get('name')}"


def slice_from_body(body: Mapping[str, Any]) -> SliceInfo | None:
    """An IPv4 EndpointSlice of a Service, else None (IPv6/FQDN slices, slices of no Service)."""
    meta = body.get("metadata", {}) or {}
    labels = meta.get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL)
    if not service or body.get("addressType", "IPv4") != "IPv4":
        return None
    namespace = str(meta.get("namespace") or "default")
    ports = tuple(SlicePort(str(p.get("name") or ""), str(p.get("protocol") or "TCP").upper(), int(p["port"]))
                  for p in body.get("ports") or [] if p.get("port") is not None)
    endpoints = []
    for ep in body.get("endpoints") or []:
        addresses = tuple(ip for raw in ep.get("addresses") or [] if (ip := _ipv4(raw)) is not None)
        if not addresses:
            continue
        ready, serving, terminating = _conditions(ep.get("conditions"))
        endpoints.append(SliceEndpoint(addresses, ready, serving, terminating, ep.get("nodeName"),
                                       _pod_ref(ep.get("targetRef"), namespace)))
    return SliceInfo(namespace, str(meta["name"]), str(service), ports, tuple(endpoints),
                     headless=HEADLESS_LABEL in labels)


def slices_from_endpoints(body: Mapping[str, Any]) -> tuple[SliceInfo, ...]:
    """A v1 Endpoints object as slices, one per subset (``notReadyAddresses`` neither ready nor serving)."""
    meta = body.get("metadata", {}) or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta["name"])
    headless = HEADLESS_LABEL in (meta.get("labels") or {})
    out = []
    for index, subset in enumerate(body.get("subsets") or []):
        ports = tuple(SlicePort(str(p.get("name") or ""), str(p.get("protocol") or "TCP").upper(), int(p["port"]))
                      for p in subset.get("ports") or [])
        endpoints = []
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a in subset.get(field) or []:
                ip = _ipv4(a.get("ip"))
                if ip is not None:
                    endpoints.append(SliceEndpoint((ip,), ready, ready, False, a.get("nodeName"),
                                                   _pod_ref(a.get("targetRef"), namespace)))
        out.append(SliceInfo(namespace, f"{name}/{index}", name, ports, tuple(endpoints), headless=headless))
    return tuple(out)
