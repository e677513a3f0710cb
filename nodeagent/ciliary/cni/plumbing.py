"""Kernel plumbing of one pod: a veth pair between the node netns and the pod netns.

Runs in the node's network namespace (where the runtime started the plugin) with the
sync pyroute2 API — the plugin is a short-lived, single-threaded process.

Pod side (``CNI_IFNAME`` inside ``CNI_NETNS``): ``<ip>/32``, ``lo`` up, a link-scope
route to the gateway ``169.254.1.1`` and the default route via it.
Node side (``cy`` + 11 hex chars of sha256(containerID)): ``169.254.1.1/32`` (the
same address on every host veth), up, a ``<ip>/32`` route to the pod, and the
sysctls ``net.ipv4.ip_forward=1`` and ``net.ipv4.conf.<veth>.rp_filter=0``.
Deleting the host veth removes its peer, so teardown only needs the node side.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ciliary.cni import errors

log = logging.getLogger(__name__)

GATEWAY = IPv4Address("169.254.1.1")
HOST_IFNAME_PREFIX = "cy"
SCOPE_LINK = 253
AF_INET = 2
IFF_UP = 1
PROC_SYS = Path("/proc/sys")
SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class PodLink:
    """What ADD created, as the result and the agent need it."""

    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str
    netns: str
    ipv4: IPv4Address
    netns_cookie: int = 0
    """The pod's network namespace cookie (``SO_NETNS_COOKIE``), 0 when it could not be read: the socket
    load balancer's programs tell the pod's sockets by it (the agent's ``cy_lb4_podns``)."""


def host_ifname_for(container_id: str) -> str:
    """The node-side veth name: ``cy`` + the first 11 hex chars of sha256(containerID)."""
    return HOST_IFNAME_PREFIX + hashlib.sha256(container_id.encode()).hexdigest()[:11]


@contextlib.contextmanager
def _pod_ns(netns_path: str) -> Iterator[IPRoute]:
    """An IPRoute bound to an existing netns (``flags=0``: never create one)."""
    try:
        ipr = IPRoute(netns=netns_path, flags=0)
    except FileNotFoundError as exc:
        raise errors.CniError(
            errors.ErrorCode.UNKNOWN_CONTAINER, f"Network namespace {netns_path} does not exist", str(exc)
        ) from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _mac(ipr: IPRoute, index: int) -> str:
    return str(ipr.get_links(index)[0].get("address"))


def write_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` of the current network namespace."""
    (PROC_SYS / key).write_text(value)


def setup(*, container_id: str, netns_path: str, ifname: str, ipv4: IPv4Address, mtu: int) -> PodLink:
    """Create and configure the veth pair; on failure nothing is left behind."""
    host_ifname = host_ifname_for(container_id)
    teardown(container_id=container_id)  # a stale veth of an interrupted ADD for this container
    if not os.path.exists(netns_path):
        raise errors.CniError(errors.ErrorCode.UNKNOWN_CONTAINER, f"Network namespace {netns_path} does not exist")
    try:
        return _setup(host_ifname, netns_path, ifname, ipv4, mtu)
    except BaseException:
        teardown(container_id=container_id)
        raise


def _setup(host_ifname: str, netns_path: str, ifname: str, ipv4: IPv4Address, mtu: int) -> PodLink:
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as node:
                node.link(
                    "add", ifname=host_ifname, kind="veth", mtu=mtu,
                    peer={"ifname": ifname, "net_ns_fd": ns_fd, "mtu": mtu},
                )
                host_index = _index(node, host_ifname)
                if host_index is None:
                    raise errors.CniError(errors.ErrorCode.PLUMBING_FAILED, f"Veth {host_ifname} vanished after creation")
                write_sysctl("net/ipv4/ip_forward", "1")
                write_sysctl(f"net/ipv4/conf/{host_ifname}/rp_filter", "0")
                node.addr("add", index=host_index, address=str(GATEWAY), prefixlen=32, scope=SCOPE_LINK)
                node.link("set", index=host_index, state="up")
                node.route("replace", dst=f"{ipv4}/32", oif=host_index, scope=SCOPE_LINK)
                host_mac = _mac(node, host_index)
        finally:
            os.close(ns_fd)
        with _pod_ns(netns_path) as pod:
            pod_index = _index(pod, ifname)
            if pod_index is None:
                raise errors.CniError(errors.ErrorCode.PLUMBING_FAILED, f"Interface {ifname} missing in {netns_path}")
            lo_index = _index(pod, "lo")
            if lo_index is not None:
                pod.link("set", index=lo_index, state="up")
            pod.addr("add", index=pod_index, address=str(ipv4), prefixlen=32)
            pod.link("set", index=pod_index, state="up")
            pod.route("replace", dst=f"{GATEWAY}/32", oif=pod_index, scope=SCOPE_LINK)
            pod.route("replace", dst="0.0.0.0/0", gateway=str(GATEWAY), oif=pod_index)
            pod_mac = _mac(pod, pod_index)
    except NetlinkError as exc:
        raise errors.CniError(
            errors.ErrorCode.PLUMBING_FAILED, f"Failed to plumb {ifname} in {netns_path}", f"netlink: {exc}"
        ) from exc
    except OSError as exc:
        raise errors.CniError(
            errors.ErrorCode.PLUMBING_FAILED, f"Failed to plumb {ifname} in {netns_path}", str(exc)
        ) from exc
    return PodLink(host_ifname, host_index, host_mac, ifname, pod_mac, netns_path, ipv4, _cookie_of(netns_path))


def _cookie_of(netns_path: str) -> int:
    """The namespace's cookie; 0 when it cannot be read (the pod's flows then name no Service: nothing else
    depends on it)."""
    found: list[int] = []

    def read() -> None:  # in a thread of its own: setns(2) moves only the calling thread, which then ends
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                found.append(int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little"))
        except OSError as exc:
            log.warning("Network namespace cookie of %s not read: %s", netns_path, exc)

    reader = threading.Thread(target=read, name="netns-cookie", daemon=True)
    reader.start()
    reader.join(5.0)
    return found[0] if found else 0


def teardown(*, container_id: str) -> bool:
    """Delete the node-side veth (its peer goes with it); True when something was deleted."""
    host_ifname = host_ifname_for(container_id)
    try:
        with IPRoute() as node:
            index = _index(node, host_ifname)
            if index is None:
                return False
            node.link("del", index=index)
            return True
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise errors.CniError(
            errors.ErrorCode.PLUMBING_FAILED, f"Failed to delete veth {host_ifname}", f"netlink: {exc}"
        ) from exc


def check(*, container_id: str, netns_path: str, ifname: str, ipv4: IPv4Address) -> None:
    """Raise CHECK_FAILED unless the veth, addresses and routes ADD created are present."""
    host_ifname = host_ifname_for(container_id)
    problems: list[str] = []
    with IPRoute() as node:
        host_index = _index(node, host_ifname)
        if host_index is None:
            problems.append(f"host veth {host_ifname} is missing")
        else:
            link = node.get_links(host_index)[0]
            if not link["flags"] & IFF_UP:
                problems.append(f"host veth {host_ifname} is down")
            if str(GATEWAY) not in {a.get("address") for a in node.get_addr(index=host_index, family=AF_INET)}:
                problems.append(f"host veth {host_ifname} lacks {GATEWAY}/32")
            if not any(
                r.get("dst") == str(ipv4) and r["dst_len"] == 32 and r.get("oif") == host_index
                for r in node.get_routes(family=AF_INET)
            ):
                problems.append(f"route {ipv4}/32 dev {host_ifname} is missing")
    with _pod_ns(netns_path) as pod:
        pod_index = _index(pod, ifname)
        if pod_index is None:
            problems.append(f"{ifname} is missing in {netns_path}")
        else:
            addresses = {(a.get("address"), a["prefixlen"]) for a in pod.get_addr(index=pod_index, family=AF_INET)}
            if (str(ipv4), 32) not in addresses:
                problems.append(f"{ifname} lacks {ipv4}/32")
            gateways = {r.get("gateway") for r in pod.get_routes(family=AF_INET) if r["dst_len"] == 0}
            if str(GATEWAY) not in gateways:
                problems.append(f"default route via {GATEWAY} is missing in {netns_path}")
    if problems:
        raise errors.CniError(errors.ErrorCode.CHECK_FAILED, "Pod network check failed", "; ".join(problems))
