"""Health-check node ports served in a network namespace the agent is not in (real sockets, real netns).

The test creates its own namespace (loopback only), runs ``service_health.HealthPorts`` from the
root namespace as an agent the lab starts as a process does (real nodes without the chart:
``Lab.start_agent``, ``CILIARY_AGENT_NETNS``), and asks from inside the namespace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from ciliary.nodeagent import netns_sockets
from ciliary.nodeagent.service_health import HealthPorts, ProxyHealth
from ciliary.operator.services.intent import HealthCheckIntent

GET = ("import sys, urllib.request, urllib.error\n"
       "try:\n"
       "    r = urllib.request.urlopen(sys.argv[1], timeout=2); print(r.status, r.read().decode())\n"
       "except urllib.error.HTTPError as e:\n"
       "    print(e.code, e.read().decode())\n"
       "except OSError:\n"
       "    print(0, '{}')\n")




async def get(netns: str, url: str) -> tuple[int, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, sys.executable, "-c", GET, url,
                                                stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    status, _, body = out.decode().strip().partition(" ")
    return int(status), json.loads(body)


def test_ports_open_answer_and_close_inside_the_namespace(netns: str) -> None:
    health = {"now": ProxyHealth(healthy=False, last_updated=None)}

    async def scenario() -> None:
        ports = HealthPorts("n1", netns=netns, health=lambda: health["now"], clock=lambda: 1_700_000_000.0,
                            proxy_healthz=("127.0.0.1", 10256))
        await ports.start()
        try:
            assert (await get(netns, "http://127.0.0.1:10256/healthz"))[0] == 503  # nothing applied yet
            await ports.reconcile([HealthCheckIntent(service="a/web", port=32001, local_endpoints=1),
                                   HealthCheckIntent(service="a/db", port=32002, local_endpoints=0)])
            assert (await get(netns, "http://127.0.0.1:32001/"))[0] == 503  # the proxy is not healthy
            health["now"] = ProxyHealth(healthy=True, last_updated=1_699_999_999.0)
            assert await get(netns, "http://127.0.0.1:32001/anything") == (200, {
                "service": {"namespace": "a", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": True})
            assert (await get(netns, "http://127.0.0.1:32002/"))[0] == 503
            assert (await get(netns, "http://127.0.0.1:10256/livez"))[0] == 200
            # counts change in place; a Service that is gone closes its port
            await ports.reconcile([HealthCheckIntent(service="a/db", port=32002, local_endpoints=3)])
            assert (await get(netns, "http://127.0.0.1:32002/"))[1]["localEndpoints"] == 3
            assert (await get(netns, "http://127.0.0.1:32001/"))[0] == 0
            assert [d["port"] for d in ports.document()] == [32002]
        finally:
            await ports.close()
        assert (await get(netns, "http://127.0.0.1:32002/"))[0] == 0

    asyncio.run(scenario())


def test_a_port_in_use_is_reported_not_fatal(netns: str) -> None:
    taken = netns_sockets.listen_tcp(netns, "0.0.0.0", 32003)

    async def scenario() -> None:
        ports = HealthPorts("n1", netns=netns, health=lambda: ProxyHealth(True, 1.0), clock=lambda: 2.0,
                            proxy_healthz=("127.0.0.1", 10257))
        try:
            await ports.reconcile([HealthCheckIntent(service="a/web", port=32003, local_endpoints=1)])
            doc = ports.document()
            assert doc[0]["serving"] is False and "Address already in use" in doc[0]["error"], doc
        finally:
            await ports.close()

    try:
        asyncio.run(scenario())
    finally:
        taken.close()


def test_a_missing_namespace_is_a_specific_error() -> None:
    with pytest.raises(netns_sockets.NetnsSocketError, match="cy-no-such-netns"):
        netns_sockets.listen_tcp("cy-no-such-netns", "127.0.0.1", 32004)


def test_without_kube_proxy_answers_no_health_check_port_is_opened(netns: str) -> None:
    """--proxy-healthz-addr off: kube-proxy still runs on the node and answers both kinds itself."""

    async def scenario() -> None:
        ports = HealthPorts("n1", netns=netns, health=lambda: ProxyHealth(True, 1.0), clock=lambda: 2.0,
                            proxy_healthz=None)
        await ports.start()
        try:
            await ports.reconcile([HealthCheckIntent(service="a/web", port=32005, local_endpoints=1)])
            assert ports.document() == [] and ports.listeners == {}
            assert (await get(netns, "http://127.0.0.1:32005/"))[0] == 0
        finally:
            await ports.close()

    asyncio.run(scenario())


async def get_text(netns: str, url: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, sys.executable, "-c", GET, url,
                                                stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    status, _, body = out.decode().strip().partition(" ")
    return int(status), body


def test_kube_proxys_status_port_says_ebpf_and_is_closed_with_the_rest(netns: str) -> None:
    """--proxy-status-addr: /proxyMode on kube-proxy's metrics address answers the mode serving the node's
    Services (what the upstream "should check kube-proxy urls" asks); off (None): the port stays free."""

    async def scenario() -> None:
        ports = HealthPorts("n1", netns=netns, health=lambda: ProxyHealth(False, None), clock=lambda: 2.0,
                            proxy_healthz=None, proxy_status=("127.0.0.1", 10249))
        await ports.start()
        try:
            assert await get_text(netns, "http://127.0.0.1:10249/proxyMode") == (200, "ebpf")
            assert (await get_text(netns, "http://127.0.0.1:10249/metrics"))[0] == 404
            assert (await get_text(netns, "http://127.0.0.1:10256/healthz"))[0] == 0  # healthz off: not opened
        finally:
            await ports.close()
        assert (await get_text(netns, "http://127.0.0.1:10249/proxyMode"))[0] == 0
        off = HealthPorts("n1", netns=netns, health=lambda: ProxyHealth(True, 1.0), clock=lambda: 2.0,
                          proxy_healthz=None, proxy_status=None)
        await off.start()
        try:
            assert (await get_text(netns, "http://127.0.0.1:10249/proxyMode"))[0] == 0
        finally:
            await off.close()

    asyncio.run(scenario())
