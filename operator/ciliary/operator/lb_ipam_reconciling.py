"""The operator's LB IPAM loop: CiliumLoadBalancerIPPools + LoadBalancer Services -> their IPs, in their status.

Watched bodies arrive through ``kube/service_handlers.py`` (Services into the ``ServiceModel``, pools
into a :class:`PoolModel`). A pass parses the pools (a refused one shows why in its PoolConflict
condition), allocates (``services.lb_ipam``, pure), plans the status patches
(``services.lb_ipam_patches``, pure) and merge-patches only what differs: each Service's
``status.loadBalancer.ingress`` and ``io.cilium/lb-ipam-request-satisfied`` condition, each pool's
counts. Dormant, as Cilium's, until a pool exists; with every pool gone it still clears the Services
it gave IPs to. The load balancer then serves an ingress IP like any other (``services.resolution``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ciliary.operator.api.lb_ippool import LBIPPool, PoolInvalidError, parse_pool
from ciliary.operator.kube.kubeapi import GROUP, MERGE_PATCH, VERSION
from ciliary.operator.kube.service_model import ServiceModel
from ciliary.operator.services.lb_ipam import allocate
from ciliary.operator.services.lb_ipam_patches import (
    claim_from_body,
    managed,
    pool_patch,
    release_patch,
    service_patch,
)

log = logging.getLogger(__name__)

POOL_PLURAL = "ciliumloadbalancerippools"


class PoolModel:
    """Pool name -> its last body; ``changed`` is set on every change."""

    def __init__(self) -> None:
        self.bodies: dict[str, Mapping[str, Any]] = {}
        self.changed = asyncio.Event()

    def set_pool(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        name = str((body.get("metadata") or {}).get("name", ""))
        if deleted:
            self.bodies.pop(name, None)
        else:
            self.bodies[name] = body
        self.changed.set()


class LBIPAMReconciler:
    def __init__(self, services: ServiceModel, pools: PoolModel, api: client.ApiClient, *,
                 settle_seconds: float = 0.05, poll: float = 30.0, timeout: float = 10.0) -> None:
        self.services = services
        self.pools = pools
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.settle_seconds = settle_seconds
        self.poll = poll
        self.timeout = timeout

    async def run_once(self) -> int:
        """One pass; returns the number of objects patched."""
        parsed: list[LBIPPool] = []
        invalid: dict[str, str] = {}
        for name, body in list(self.pools.bodies.items()):
            try:
                parsed.append(parse_pool(body))
            except PoolInvalidError as exc:
                invalid[name] = exc.message
        bodies = dict(self.services.bodies)
        if not self.pools.bodies and not any(managed(b) for b in bodies.values()):
            return 0  # dormant
        claims = {key: claim_from_body(b) for key, b in bodies.items()}
        result = allocate(parsed, claims.values())
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        written = 0
        for key, claim in claims.items():
            release = None if claim.eligible else release_patch(bodies[key])
            if release is not None and await self._patch_service(key, release):
                written += 1
                log.info("LB IPAM: Service %s is no longer a LoadBalancer without a class: its IPs released", key)
        for key, outcome in result.services.items():
            body = bodies[key]
            if not self.pools.bodies and not managed(body):
                continue
            patch = service_patch(body, outcome, now)
            if patch is not None and await self._patch_service(key, patch):
                written += 1
                log.info("LB IPAM: Service %s: %s", key, ", ".join(outcome.ips) or f"no IP ({outcome.reason})")
        for name, body in list(self.pools.bodies.items()):
            patch = pool_patch(body, result.pools.get(name), invalid.get(name, ""), now)
            if patch is not None and await self._patch_pool(name, patch):
                written += 1
        return written

    async def _patch_service(self, key: str, patch: Mapping[str, Any]) -> bool:
        namespace, name = key.split("/", 1)
        try:
            written = await self.core.patch_namespaced_service_status(  # type: ignore[call-arg]
                name, namespace, patch, _content_type=MERGE_PATCH, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("LB IPAM: status of Service %s not written: %s %s", key, exc.status, exc.reason)
            return False
        # the next pass sees this write even if its watch event has not arrived yet
        self.services.set_service(self.api.sanitize_for_serialization(written))
        return True

    async def _patch_pool(self, name: str, patch: Mapping[str, Any]) -> bool:
        try:
            await self.custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]
                GROUP, VERSION, POOL_PLURAL, name, patch, _content_type=MERGE_PATCH, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("LB IPAM: status of CiliumLoadBalancerIPPool %s not written: %s %s", name, exc.status,
                            exc.reason)
            return False
        return True

    async def run(self, ready: asyncio.Event) -> None:
        await ready.wait()
        while True:
            self.services.bodies_changed.clear()
            self.pools.changed.clear()
            try:
                await self.run_once()
            except Exception:  # a pass that fails is retried at the next change or poll, never fatal
                log.exception("LB IPAM pass failed")
            waits = [asyncio.ensure_future(self.services.bodies_changed.wait()),
                     asyncio.ensure_future(self.pools.changed.wait())]
            try:
                await asyncio.wait(waits, timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            await asyncio.sleep(self.settle_seconds)


async def initial_list(api: client.ApiClient, pools: PoolModel) -> None:
    """Every pool once before the first pass (none when the CRD is not installed)."""
    try:
        listed: Any = await client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, POOL_PLURAL)
    except ApiException as exc:
        if exc.status == 404:
            log.warning("LB IPAM: the CiliumLoadBalancerIPPool CRD is not installed; no LoadBalancer IPs are assigned")
            return
        raise
    for body in listed.get("items", []):
        pools.set_pool(body)
