"""kopf glue for load balancing: watch Services and EndpointSlices (or v1 Endpoints) into a ``ServiceModel``.

Raw watch-event handlers (``kopf.on.event``), nothing written onto the objects. They are ``async``
(they do no I/O): kopf runs a sync handler in a worker thread, where it would change the model while
the LB reconcile loop iterates it on the event loop (seen at 5,000 Services: "dictionary changed
size during iteration", the event lost). Which endpoint
API is watched is the operator's ``--endpoints-api`` flag (``endpointslices``, the default, or
``endpoints`` for clusters without the EndpointSlice API). :func:`initial_list` lists everything
once before the first LB reconcile. With LB IPAM, CiliumLoadBalancerIPPools are watched too (into a
``PoolModel``).
"""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes_asyncio import client

from ciliary.operator.kube.kubeapi import GROUP, VERSION
from ciliary.operator.kube.service_model import ServiceModel
from ciliary.operator.lb_ipam_reconciling import POOL_PLURAL, PoolModel

ENDPOINT_APIS = ("endpointslices", "endpoints")


def register(registry: kopf.OperatorRegistry, model: ServiceModel, endpoints_api: str,
             pools: PoolModel | None = None) -> None:
    async def service_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        model.set_service(dict(body), deleted=type == "DELETED")

    async def pool_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if pools is not None:
            pools.set_pool(dict(body), deleted=type == "DELETED")

    async def slice_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        model.set_slice(dict(body), deleted=type == "DELETED")

    async def endpoints_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        model.set_endpoints(dict(body), deleted=type == "DELETED")

    kopf.on.event("", "v1", "services", id="service_event", registry=registry)(service_event)
    if pools is not None:
        kopf.on.event(GROUP, VERSION, POOL_PLURAL, id="lbippool_event", registry=registry)(pool_event)
    if endpoints_api == "endpoints":
        kopf.on.event("", "v1", "endpoints", id="endpoints_event", registry=registry)(endpoints_event)
    else:
        kopf.on.event("discovery.k8s.io", "v1", "endpointslices", id="endpointslice_event",
                      registry=registry)(slice_event)


async def initial_list(api: client.ApiClient, model: ServiceModel, endpoints_api: str) -> None:
    core = client.CoreV1Api(api)
    for svc in (await core.list_service_for_all_namespaces()).items:
        model.set_service(api.sanitize_for_serialization(svc))
    if endpoints_api == "endpoints":
        for eps in (await core.list_endpoints_for_all_namespaces()).items:
            model.set_endpoints(api.sanitize_for_serialization(eps))
    else:
        discovery = client.DiscoveryV1Api(api)
        for sl in (await discovery.list_endpoint_slice_for_all_namespaces()).items:
            model.set_slice(api.sanitize_for_serialization(sl))
