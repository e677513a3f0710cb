"""The L7 proxy's node plumbing in a private namespace: idempotent, repaired, and removed when L7 is off.

Each test gets its own network namespace (created and deleted here): the plumbing for one
``--proxy-port``, then what breaks it in real life — another port (an agent restarted with a
new ``--proxy-port``), a flushed mangle table, a deleted device, a device re-created under another
ifindex, the deleted rule and route of the redirect table (``proxy_routing``) — and ``check`` must name it,
``ensure`` (and the keeper that runs it periodically) must repair it, leaving exactly one rule
of each kind; ``teardown`` must leave nothing and put ``ip_early_demux`` back.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from ciliary.nodeagent import proxy_plumbing, proxy_plumbing_keeper

pytestmark = pytest.mark.integration


def sh(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True,
                          timeout=20).stdout


@pytest.fixture()
def netns(tool) -> Iterator[str]:
    tool("ip")
    tool("iptables")
    name = f"cyt-plumb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


def tproxy_ports(netns: str) -> list[int]:
    return [proxy_plumbing._port_of(rule) for rule in proxy_plumbing._our_tproxy_rules(netns)]


def test_a_new_proxy_port_replaces_the_old_rule(netns: str) -> None:
    device = proxy_plumbing.ensure(netns, 15001)
    assert proxy_plumbing.check(netns, 15001, device) == []
    assert proxy_plumbing.ensure(netns, 15001, device) == device  # idempotent
    assert tproxy_ports(netns) == [15001]
    assert proxy_plumbing.check(netns, 15002, device) == ["no TPROXY rule to port 15002 in mangle PREROUTING",
                                                          "stale TPROXY rules to ports 15001"]
    proxy_plumbing.ensure(netns, 15002, device)  # an agent restarted with another --proxy-port
    assert tproxy_ports(netns) == [15002]
    assert proxy_plumbing.check(netns, 15002, device) == []
    assert sh(netns, "ip", "rule", "show", "table", str(proxy_plumbing.ROUTE_TABLE)).count("fwmark") == 1


def test_a_flushed_mangle_table_and_a_deleted_device_are_noticed_and_repaired(netns: str) -> None:
    device = proxy_plumbing.ensure(netns, 15001)
    sh(netns, "iptables", "-w", "-t", "mangle", "-F")
    sh(netns, "ip", "link", "del", proxy_plumbing.PROXY_DEVICE)
    sh(netns, "ip", "rule", "add", "fwmark", "0x1", "lookup", str(proxy_plumbing.ROUTE_TABLE), "priority", "2013")
    problems = proxy_plumbing.check(netns, 15001, device)
    assert f"no proxy device {proxy_plumbing.PROXY_DEVICE}" in problems
    assert "no TPROXY rule to port 15001 in mangle PREROUTING" in problems
    assert f"stale ip rules looking up table {proxy_plumbing.ROUTE_TABLE}" in problems
    keeper = proxy_plumbing_keeper.PlumbingKeeper(netns, 15001, device, every=0.05)

    async def one_pass() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(keeper.run(stop))
        for _ in range(200):
            await asyncio.sleep(0.05)
            if keeper.repairs and not keeper.problems:
                break
        stop.set()
        await task

    asyncio.run(one_pass())
    assert keeper.repairs >= 1 and keeper.problems == []
    assert proxy_plumbing.check(netns, 15001, device) == []  # the same ifindex and MAC as the programs use
    assert tproxy_ports(netns) == [15001]


def test_teardown_removes_everything_and_restores_early_demux(netns: str) -> None:
    assert sh(netns, "sysctl", "-n", proxy_plumbing.EARLY_DEMUX).strip() == "1"
    proxy_plumbing.ensure(netns, 15001)
    proxy_plumbing.ensure(netns, 15002)
    assert sh(netns, "sysctl", "-n", proxy_plumbing.EARLY_DEMUX).strip() == "0"
    removed = proxy_plumbing.teardown(netns)
    assert f"device {proxy_plumbing.PROXY_DEVICE}" in removed and f"{proxy_plumbing.EARLY_DEMUX}=0" in removed
    assert proxy_plumbing.PROXY_DEVICE not in sh(netns, "ip", "-o", "link")
    assert "lookup" not in sh(netns, "ip", "rule", "show", "table", str(proxy_plumbing.ROUTE_TABLE))
    assert sh(netns, "ip", "route", "show", "table", str(proxy_plumbing.ROUTE_TABLE)).strip() == ""
    assert tproxy_ports(netns) == []
    assert sh(netns, "sysctl", "-n", proxy_plumbing.EARLY_DEMUX).strip() == "1"
    assert proxy_plumbing.teardown(netns) == []  # nothing left: nothing done (a node that never ran L7)


def test_a_recreated_device_and_the_redirect_table_are_noticed_and_repaired(netns: str) -> None:
    from ciliary.nodeagent import proxy_routing

    device = proxy_plumbing.ensure(netns, 15001)
    table = str(proxy_routing.datapath_constants().table)
    sh(netns, "ip", "link", "del", proxy_plumbing.PROXY_DEVICE)
    sh(netns, "ip", "link", "add", "cyt-filler", "index", str(device.ifindex), "type", "veth", "peer", "name",
       "cyt-filler2")  # the old ifindex is taken for a moment, so the new pair gets another one
    sh(netns, "ip", "link", "add", proxy_plumbing.PROXY_DEVICE, "type", "veth", "peer", "name", "cyt-other")
    sh(netns, "ip", "link", "del", "cyt-filler")
    sh(netns, "ip", "route", "flush", "table", table)
    sh(netns, "ip", "rule", "del", "table", table)
    problems = proxy_plumbing.check(netns, 15001, device)
    assert any(p.startswith(f"{proxy_plumbing.PROXY_DEVICE} is ifindex ") for p in problems), problems
    assert f"no local default route in table {table}" in problems
    assert any(p.startswith("no ip rule fwmark") and p.endswith(f"lookup {table}") for p in problems), problems
    proxy_plumbing.ensure(netns, 15001, device)
    assert proxy_plumbing.check(netns, 15001, device) == []  # the rendered ifindex and MAC again, table back
    assert f"{device.ifindex}: {proxy_plumbing.PROXY_DEVICE}@" in sh(netns, "ip", "-o", "link")


def test_in_the_nodes_own_namespace_sysctls_are_written_under_the_given_dir(netns: str, tmp_path) -> None:
    """An agent in the node's namespace (real nodes: a container, /proc/sys read-only) writes the network
    sysctls as files under ``--sysctl-net-dir`` (the chart mounts the node's /proc/sys/net there)."""
    import sys

    mounted = tmp_path / "net"  # stands for the chart's /host/proc/sys/net: a bind mount of the real one
    script = (
        "import pathlib, sys; from ciliary.nodeagent import proxy_plumbing as p; "
        "p.SYSCTL_NET_DIR = pathlib.Path(sys.argv[1]); d = p.ensure('', 15001); "
        "assert p.check('', 15001, d) == [], p.check('', 15001, d); "
        "print(p.teardown(''))")
    out = subprocess.run(["ip", "netns", "exec", netns, "unshare", "--mount", "sh", "-c",
                          f'mkdir -p {mounted} && mount --bind /proc/sys/net {mounted} && '
                          # /proc/sys read-only, as a container runtime mounts it: only the dir is writable
                          'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && '
                          '! sh -c "echo 1 > /proc/sys/net/ipv4/ip_forward" 2>/dev/null && '
                          f'"$0" -c "$1" {mounted} && test "$(cat /proc/sys/net/ipv4/ip_early_demux)" = 1',
                          sys.executable, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ip_early_demux=0" in out.stdout  # it was set (through the mounted dir), then put back
    assert sh(netns, "cat", "/proc/sys/net/ipv4/ip_early_demux").strip() == "1"
