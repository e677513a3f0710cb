"""``ciliary-ui``'s HTTP shell over a real agent Observer API on loopback (an in-process FlowHub behind
``observer_server``): the graph JSON, the filters sent as GetFlows filters, 400 for a bad
parameter (ours or the server's), 502 when the server is unreachable, and a page that loads nothing from elsewhere."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ciliary.nodeagent import flowapi, observer_server
from ciliary.nodeagent.datapath import maps
from ciliary.operator import service_map_ui

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodeagent"))
from test_hubble_convert import INTENT, event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_ui(server: str) -> tuple[web.AppRunner, service_map_ui.ServiceMapApp, str]:
    app = service_map_ui.ServiceMapApp(server, refresh_s=1.0)
    runner = web.AppRunner(app.application())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, app, f"http://127.0.0.1:{port}"


@pytest.fixture
async def ui():  # type: ignore[no-untyped-def]
    import time

    hub = flowapi.FlowHub("n1", capacity=64)
    hub.set_intent(INTENT)
    now = time.time()
    hub.publish([event(t=now - 2), event(t=now - 1, flags=0x02),  # xwing-like peer (301) -> deathstar dropped
                 event("forwarded", maps.Reason.OK_POLICY, dport=443, t=now - 1),
                 event("forwarded", maps.Reason.OK_POLICY, is_reply=True, t=now - 1),
                 event(t=now - 3600)])  # outside the default window
    address = f"127.0.0.1:{free_port()}"
    server = await observer_server.start(hub, address)
    runner, app, base = await start_ui(address)
    try:
        async with aiohttp.ClientSession() as session:
            yield session, base
    finally:
        await runner.cleanup()
        await app.close()
        await server.stop(grace=None)


async def test_graph_json_from_the_observer_api(ui) -> None:  # type: ignore[no-untyped-def]
    session, base = ui
    async with session.get(f"{base}/api/service-map?namespace=default") as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        graph = await r.json()
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    assert sorted(names.values()) == ["deathstar", "org=alliance"]  # the peer is known by its labels only
    edges = {(names[e["source"]], names[e["target"]], e["port"]): e for e in graph["edges"]}
    assert edges["org=alliance", "deathstar", 80]["state"] == "dropped"
    assert edges["org=alliance", "deathstar", 80]["dropped"] == 2  # the hour-old drop is outside the window
    assert edges["org=alliance", "deathstar", 443]["state"] == "forwarded"
    assert graph["replies_omitted"] == 1 and graph["namespace"] == "default" and graph["window_seconds"] == 300
    async with session.get(f"{base}/api/service-map?namespace=default&window=7200") as r:
        assert (await r.json())["flows_read"] == 5
    async with session.get(f"{base}/api/service-map?namespace=kube-system") as r:
        assert (await r.json())["nodes"] == []  # the server filtered: nothing of that namespace
    async with session.get(f"{base}/api/service-map?verdict=FORWARDED") as r:
        assert {e["state"] for e in (await r.json())["edges"]} == {"forwarded"}
    async with session.get(f"{base}/api/service-map?to-port=443&label=org%3Dalliance") as r:
        body = await r.json()
        assert [e["port"] for e in body["edges"]] == [443]
        assert body["criteria"] == {"label": ["org=alliance"], "to-port": ["443"]}
    async with session.get(f"{base}/api/namespaces") as r:
        assert (await r.json())["namespaces"] == ["default"]
    async with session.get(f"{base}/healthz") as r:
        assert r.status == 200


async def test_bad_parameters_are_400_naming_the_parameter(ui) -> None:  # type: ignore[no-untyped-def]
    session, base = ui
    for query, parameter in (("namespace=NOT%20OK", "namespace"), ("verdict=MAYBE", "verdict"),
                             ("window=-1", "window"), ("podd=x", "podd")):
        async with session.get(f"{base}/api/service-map?{query}") as r:
            assert r.status == 400 and (await r.json())["parameter"] == parameter
    # a value only the server can judge: refused there (INVALID_ARGUMENT), 400 here with its message
    async with session.get(f"{base}/api/service-map?to-port=eighty") as r:
        assert r.status == 400 and "destination_port" in (await r.json())["error"]


async def test_unreachable_server_is_502() -> None:
    runner, app, base = await start_ui(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/api/service-map") as r:
            assert r.status == 502 and "UNAVAILABLE" in (await r.json())["error"]
    finally:
        await runner.cleanup()
        await app.close()


async def test_page_is_self_contained(ui) -> None:  # type: ignore[no-untyped-def]
    session, base = ui
    async with session.get(f"{base}/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
        html = await r.text()
    assert "__REFRESH_MS__" not in html and "const REFRESH_MS = 1000;" in html
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", html, re.I)
    # the only absolute URL is SVG's XML namespace name, which is never fetched
    assert set(re.findall(r"https?://[^\s\"'`]+", html)) == {"http://www.w3.org/2000/svg"}
    assert "fetch(`/api/service-map?" in html and 'fetch("/api/namespaces"' in html
