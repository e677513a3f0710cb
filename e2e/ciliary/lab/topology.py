"""The lab's network: an underlay bridge, one namespace per node, and the world host.

Everything is created inside network namespaces the lab owns; no address or route
is ever added to the root namespace, so no lab packet can leave the machine.

  <prefix>-underlay   bridge br0 joining every node's eth0 and the world host's eth0
  <prefix>-node-i     eth0 192.0.2.(10+i)/24, forwarding on, routes to the other pod CIDRs
  <prefix>-world      eth0 192.0.2.100/24, routes to every pod CIDR through its node
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from ciliary.lab.layout import (
    LB_IP_POOL,
    UNDERLAY,
    WORLD_DNS_IP,
    WORLD_IP,
    LabLayout,
    node_index,
    node_ip,
    pod_cidr,
)

NETNS_DIR = Path("/run/netns")


class TopologyError(RuntimeError):
    """An ip(8) command failed while building the lab network."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, text=True, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
                   check=True, capture_output=True, timeout=30)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []


def _link_exists(netns: str, name: str) -> bool:
    return ip("link", "show", name, netns=netns, check=False).returncode == 0


def ensure_netns(name: str) -> None:
    if not netns_exists(name):
        ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def ensure_underlay(layout: LabLayout) -> None:
    ns = layout.underlay_netns
    ensure_netns(ns)
    if not _link_exists(ns, "br0"):
        ip("link", "add", "br0", "type", "bridge", netns=ns)
    ip("link", "set", "br0", "up", netns=ns)


def _attach_host(layout: LabLayout, netns: str, port: str, address: str) -> None:
    """A veth from the underlay bridge (port name ``port``) to ``eth0`` in ``netns``."""
    under = layout.underlay_netns
    if not _link_exists(netns, "eth0"):
        if _link_exists(under, port):
            ip("link", "del", port, netns=under)
        ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns, netns=under)
    ip("link", "set", port, "master", "br0", "up", netns=under)
    ip("addr", "replace", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0", netns=netns)
    ip("link", "set", "eth0", "up", netns=netns)


def ensure_node(layout: LabLayout, node: str, all_nodes: Sequence[str]) -> None:
    index = node_index(node)
    ns = layout.node_netns(node)
    ensure_netns(ns)
    _attach_host(layout, ns, f"n{index}", node_ip(index))
    sysctl(ns, "net.ipv4.ip_forward", "1")
    sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
    sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")
    for other in all_nodes:
        j = node_index(other)
        if j != index:
            ip("route", "replace", pod_cidr(j), "via", node_ip(j), netns=ns)


def ensure_world(layout: LabLayout, all_nodes: Sequence[str]) -> None:
    ns = layout.world_netns
    ensure_netns(ns)
    _attach_host(layout, ns, "w0", WORLD_IP)
    ip("addr", "replace", f"{WORLD_DNS_IP}/{UNDERLAY.prefixlen}", "dev", "eth0", netns=ns)
    for node in all_nodes:
        j = node_index(node)
        ip("route", "replace", pod_cidr(j), "via", node_ip(j), netns=ns)
    if all_nodes:  # the LoadBalancer IPs, spread over every node (ECMP, hashed over the ports too)
        hops = [w for node in all_nodes for w in ("nexthop", "via", node_ip(node_index(node)))]
        ip("route", "replace", LB_IP_POOL, *hops, netns=ns)
        sysctl(ns, "net.ipv4.fib_multipath_hash_policy", "1")


def remove_all(layout: LabLayout) -> list[str]:
    """Delete every namespace of this lab (pods, nodes, world, underlay); return their names."""
    removed = []
    for name in list_netns():
        if layout.owns_netns(name):
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed
