"""``ciliary-ui``: the service map in a browser (what Hubble UI is to Hubble Relay); the HTTP shell.

Its own small process, a client of any Hubble Observer address (``--server``, default
``$HUBBLE_SERVER``; in the lab the relay): it needs no etcd credential and no cluster access, a
busy browser cannot slow the relay's gRPC clients, and it talks to the relay exactly as the
``hubble`` CLI does, so what the map shows is what ``hubble observe`` shows. Served (plaintext HTTP,
``--listen``):

- ``GET /``: one self-contained page (HTML, CSS and script inline; it fetches nothing but this
  server's ``/api/*``) drawing the graph and a flow table, refreshed every ``--refresh`` seconds;
- ``GET /api/service-map?namespace=&verdict=&window=&limit=`` and ``hubble observe``'s filters
  (``service_map_query``): the graph as JSON (``service_map``), built per request from one
  ``GetFlows`` (no follow) to the server; a bad parameter is 400 naming it (also when the server
  refuses a value), an unreachable server 502;
- ``GET /api/namespaces``: ``GetNamespaces``; ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import logging
import os
import signal
import time
from collections.abc import Sequence

import grpc
from aiohttp import web

from ciliary.hubbleapi import observer_pb2, observer_pb2_grpc
from ciliary.operator import service_map, service_map_query

log = logging.getLogger("ciliary.ui")
CALL_TIMEOUT_S = 15.0
PAGE = "service_map.html"


def page(refresh_s: float) -> str:
    html = importlib.resources.files("ciliary.operator").joinpath(PAGE).read_text(encoding="utf-8")
    return html.replace("__REFRESH_MS__", str(int(refresh_s * 1000)))


class ServiceMapApp:
    def __init__(self, server: str, refresh_s: float) -> None:
        self.server = server
        self.channel = grpc.aio.insecure_channel(server)
        self.stub = observer_pb2_grpc.ObserverStub(self.channel)
        self.html = page(refresh_s)

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.html, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:",
            "Cache-Control": "no-store"})

    async def graph(self, request: web.Request) -> web.Response:
        try:
            query = service_map_query.parse_query(request.query.items())
        except service_map_query.QueryError as exc:
            return web.json_response({"error": str(exc), "parameter": exc.parameter}, status=400)
        builder = service_map.ServiceMap()
        started = time.monotonic()
        try:
            async for response in self.stub.GetFlows(query.request(time.time()), timeout=CALL_TIMEOUT_S):
                builder.add(response)
        except grpc.aio.AioRpcError as exc:
            status = 400 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 502
            log.warning("GetFlows failed", extra={"server": self.server, "code": exc.code().name,
                                                  "details": exc.details()})
            return web.json_response({"error": f"{exc.code().name}: {exc.details()}", "server": self.server},
                                     status=status)
        body = builder.graph()
        body.update({"namespace": query.namespace, "verdicts": list(query.verdicts),
                     "criteria": {name: list(values) for name, values in query.criteria}, "window_seconds": query.window_s,
                     "limit_per_node": query.limit, "server": self.server, "generated_at": time.time(),
                     "query_ms": round((time.monotonic() - started) * 1000, 1)})
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def namespaces(self, request: web.Request) -> web.Response:
        try:
            answer = await self.stub.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return web.json_response({"error": f"{exc.code().name}: {exc.details()}"}, status=502)
        return web.json_response({"namespaces": sorted({ns.namespace for ns in answer.namespaces})})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/api/service-map", self.graph)
        app.router.add_get("/api/namespaces", self.namespaces)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def close(self) -> None:
        await self.channel.close()


async def serve(app: ServiceMapApp, listen: str, stop: asyncio.Event) -> None:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app.application(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
        log.info("Service map serving", extra={"address": listen, "server": app.server})
        await stop.wait()
    finally:
        await runner.cleanup()
        await app.close()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ciliary-ui", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--listen", default=env("CILIARY_UI_LISTEN", "127.0.0.1:12000"), metavar="HOST:PORT")
    p.add_argument("--server", default=env("HUBBLE_SERVER", "127.0.0.1:4245"), metavar="HOST:PORT",
                   help="the Hubble Observer API to read flows from (the relay)")
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between the page's refreshes")
    p.add_argument("--log-level", default=env("CILIARY_UI_LOG_LEVEL", "INFO"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if ":" not in args.listen or not args.listen.rpartition(":")[2].isdigit():
        parser.error("--listen must look like HOST:PORT")
    if not 0.2 <= args.refresh <= 3600:
        parser.error("--refresh must be between 0.2 and 3600 seconds")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(ServiceMapApp(args.server, args.refresh), args.listen, stop)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(amain())
    except OSError as exc:
        log.error("Service map failed", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
