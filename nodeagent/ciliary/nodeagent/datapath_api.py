"""``GET /v1/datapath``: what the node's datapath holds, for ``ciliary policy get|trace``.

Served on the health address next to the flow API (``health.start(..., routes=...)``).
Reads the pinned maps in the datapath thread (``Enforcer.call(Datapath.observe)``),
names local pods from the endpoint registry, resolves rule cookies through the last
applied intent and answers :func:`kernelview.kernel_document`. 503 when there is no
datapath to read (``--datapath off``, or not started yet): the CLI then says it cannot
know, instead of falling back to the operator's intent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from aiohttp import web

from ciliary.nodeagent import endpoints, enforcing, kernelview

log = logging.getLogger(__name__)


def add_routes(node: str, enforcer: enforcing.Enforcer | None, datapath: Any,
               registry: endpoints.EndpointRegistry) -> Callable[[web.Application], None]:
    async def get_datapath(_request: web.Request) -> web.Response:
        if enforcer is None:
            return web.json_response({"node": node, "error": "this agent runs without a datapath (--datapath off)"},
                                     status=503)
        outcome = enforcer.outcome
        if not outcome.started:
            return web.json_response({"node": node, "error": f"the datapath is not started: {outcome.error}"},
                                     status=503)
        try:
            state = await enforcer.call(datapath.observe)
        except (OSError, RuntimeError) as exc:
            log.error("Reading the datapath failed", extra={"node": node, "error": str(exc)})
            return web.json_response({"node": node, "error": f"reading the datapath failed: {exc}"}, status=503)
        names = {IPv4Address(str(e.ipv4)): kernelview.PodName(e.pod_namespace, e.pod_name or e.container_id,
                                                              e.pod_uid)
                 for e in registry.list()}
        applied = outcome.applied
        view = kernelview.kernel_intent(
            node, state, revision=applied.revision if applied else 0, names=names, rules_for=datapath.rules_for,
            identity_labels=applied.identity_labels if applied else None)
        return web.json_response(kernelview.kernel_document(
            view, applied_revision=applied.revision if applied else None,
            wanted_revision=outcome.wanted.revision if outcome.wanted else None, error=outcome.error))

    def register(app: web.Application) -> None:
        app.router.add_get("/v1/datapath", get_datapath)

    return register
