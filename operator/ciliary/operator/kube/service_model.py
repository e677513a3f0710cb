"""The operator's in-memory mirror of Services and their endpoints (what load balancing reads).

Fed by ``service_handlers`` (kopf watch events and the initial listing); bodies are parsed once,
at the edge, into ``services.inputs`` values. Endpoints come either from EndpointSlices (the
default) or, behind ``--endpoints-api endpoints``, from v1 Endpoints objects (each subset one
slice-shaped value). ``dirty`` is set on every change; the LB reconciler waits on it, and takes the keys
changed since its last pass (:meth:`ServiceModel.take_touched`), so its resolver looks only at those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ciliary.operator.services.incremental_resolution import Touched
from ciliary.operator.services.inputs import (
    ServiceInfo,
    SliceInfo,
    service_from_body,
    slice_from_body,
    slices_from_endpoints,
)


def _key(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata", {}) or {}
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


class ServiceModel:
    def __init__(self) -> None:
        self.services: dict[str, ServiceInfo] = {}
        self.slices: dict[str, SliceInfo] = {}
        self.bodies: dict[str, Mapping[str, Any]] = {}
        """Service ``namespace/name`` -> its last body (events are posted about it)."""
        self.dirty = asyncio.Event()
        self._touched_services: set[str] = set()
        self._touched_slices: set[str] = set()
        self.bodies_changed = asyncio.Event()
        """Set whenever a Service body changes, status included (LB IPAM's trigger)."""

    def set_service(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        key = _key(body)
        if deleted:
            if self.bodies.pop(key, None) is not None:
                self.bodies_changed.set()
            if self.services.pop(key, None) is not None:
                self._touched_services.add(key)
                self.dirty.set()
            return
        if self.bodies.get(key) != body:
            self.bodies_changed.set()
        self.bodies[key] = body
        info = service_from_body(body)
        if self.services.get(key) != info:
            self.services[key] = info
            self._touched_services.add(key)
            self.dirty.set()

    def set_slice(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        key = _key(body)
        info = None if deleted else slice_from_body(body)
        if self.slices.get(key) == info:  # one key: no scan of every slice (10,000 Services, 10,000 events)
            return
        if info is None:
            del self.slices[key]
        else:
            self.slices[key] = info
        self._touched_slices.add(key)
        self.dirty.set()

    def set_endpoints(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A v1 Endpoints object: its subsets replace every slice-shaped value it gave before."""
        key = _key(body)
        fresh = {} if deleted else {f"{s.namespace}/{s.name}": s for s in slices_from_endpoints(body)}
        self._replace(lambda k: k.startswith(key + "/"), fresh)

    def _replace(self, owned: Any, fresh: dict[str, SliceInfo]) -> None:
        old = {k: v for k, v in self.slices.items() if owned(k)}
        if old == fresh:
            return
        for k in old:
            del self.slices[k]
        self.slices.update(fresh)
        self._touched_slices.update(old.keys() | fresh.keys())
        self.dirty.set()

    def take_touched(self) -> Touched:
        """The Service and slice keys set or deleted since the last call (the LB pass's hint)."""
        touched = Touched(frozenset(self._touched_services), frozenset(self._touched_slices))
        self._touched_services.clear()
        self._touched_slices.clear()
        return touched
