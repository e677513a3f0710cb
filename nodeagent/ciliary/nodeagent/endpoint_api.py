"""The endpoint API the CNI plugin calls: HTTP/1.1 (aiohttp) on a unix socket.

- ``POST /v1/endpoints`` — body: :class:`~ciliary.nodeagent.endpoints.Endpoint` JSON
  (camelCase). 201 ``{"endpoint": …, "created": true}`` when new or changed, 200 with
  ``"created": false`` when identical (idempotent on ``containerId``); 400 for bad JSON,
  422 ``{"error", "details"}`` for a body that fails validation, 500 when a datapath
  subscriber failed (the endpoint was rolled back), 503 ``{"error": "datapath off", …}``
  when the agent runs with ``--datapath off`` (tests only): it enforces nothing, so it
  accepts no endpoint and no pod comes up unenforced (the CNI plugin's error 105).
- ``DELETE /v1/endpoints/{containerId}`` — 200 ``{"removed": bool}``, also for unknown IDs.
- ``GET /v1/endpoints`` — 200 ``{"endpoints": [...]}``.

The socket file is replaced if stale and made 0600 (only root talks to the agent).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pydantic
from aiohttp import web

from ciliary.nodeagent import endpoints

log = logging.getLogger(__name__)

REGISTRY_KEY = web.AppKey("registry", endpoints.EndpointRegistry)
ENFORCING_KEY = web.AppKey("enforcing", bool)
DATAPATH_OFF = "datapath off"
"""The ``error`` of the 503 answer an agent without datapath gives to every new endpoint."""


def _error(status: int, message: str, details: object = None) -> web.Response:
    return web.json_response({"error": message, "details": details}, status=status)


async def post_endpoint(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    if not request.app[ENFORCING_KEY]:
        log.error("Endpoint refused: the datapath is off, this agent enforces nothing")
        return _error(503, DATAPATH_OFF, "this agent runs with --datapath off and enforces no policy, "
                                         "so it accepts no endpoint")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, "Request body is not JSON", str(exc))
    try:
        endpoint = endpoints.Endpoint.model_validate(body)
    except pydantic.ValidationError as exc:
        return _error(422, "Invalid endpoint", json.loads(exc.json(include_url=False, include_input=False)))
    try:
        created = await registry.upsert(endpoint)
    except endpoints.EndpointHookError as exc:
        log.error("Endpoint refused by a subscriber", extra={"container": endpoint.container_id, "error": str(exc)})
        return _error(500, "Endpoint could not be enforced", str(exc))
    return web.json_response({"endpoint": endpoint.wire(), "created": created}, status=201 if created else 200)


async def delete_endpoint(request: web.Request) -> web.Response:
    removed = await request.app[REGISTRY_KEY].remove(request.match_info["container_id"])
    return web.json_response({"removed": removed is not None})


async def list_endpoints(request: web.Request) -> web.Response:
    return web.json_response({"endpoints": [e.wire() for e in request.app[REGISTRY_KEY].list()]})


def build_app(registry: endpoints.EndpointRegistry, *, enforcing: bool = True) -> web.Application:
    """``enforcing`` False (``--datapath off``): every POST is refused with 503."""
    app = web.Application(client_max_size=64 * 1024)
    app[REGISTRY_KEY] = registry
    app[ENFORCING_KEY] = enforcing
    app.router.add_post("/v1/endpoints", post_endpoint)
    app.router.add_get("/v1/endpoints", list_endpoints)
    app.router.add_delete("/v1/endpoints/{container_id}", delete_endpoint)
    return app


def remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket file; refuse to delete anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; not removing it")
    path.unlink()


async def start(registry: endpoints.EndpointRegistry, socket_path: Path, *, enforcing: bool = True) -> web.AppRunner:
    """Serve the API on ``socket_path`` (mode 0600); the caller cleans up the runner."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(socket_path)
    runner = web.AppRunner(build_app(registry, enforcing=enforcing), access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, str(socket_path))
    await site.start()
    os.chmod(socket_path, 0o600)
    log.info("Endpoint API listening", extra={"socket": str(socket_path)})
    return runner
