"""The node's policy routing that lets the datapath hand packets to a node-local proxy.

Owns :func:`ensure` and :func:`check`. ``lib/redirect.h`` assigns a redirected
packet to the proxy's socket and marks it; the stack delivers it to that socket
only if routing says "local". So inside the node's network namespace (never the
root one, unless the agent runs in the node's own namespace) the agent keeps

    ip link set lo up
    ip rule add fwmark CY_MARK_TO_PROXY/CY_MARK_PROXY_MASK lookup CY_PROXY_TABLE pref RULE_PRIORITY
    ip route replace local 0.0.0.0/0 dev lo table CY_PROXY_TABLE

The three numbers are declared once, in ``datapath_c/include/consts.h``, and read
from there (:func:`datapath_constants`). Nothing is removed on shutdown: like
the tc programs, the rule keeps serving a restarted agent's proxy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ciliary.nodeagent import rendering

RULE_PRIORITY = 9
"""Before the main table (32766): a marked packet is local whatever its destination."""
_RTN_LOCAL = 2
_EEXIST = 17


class ProxyRoutingError(RuntimeError):
    """The rule or route could not be installed in ``netns``."""

    def __init__(self, netns: str | None, message: str) -> None:
        super().__init__(f"proxy routing in {netns or 'the current namespace'}: {message}")
        self.netns = netns


@dataclass(frozen=True)
class ProxyConstants:
    mark: int
    mask: int
    table: int


def datapath_constants(root: Path = rendering.DATAPATH_C_DIR) -> ProxyConstants:
    """CY_MARK_TO_PROXY, CY_MARK_PROXY_MASK and CY_PROXY_TABLE as ``consts.h`` defines them."""
    text = (root / "include" / "consts.h").read_text()

    def value(name: str) -> int:
        found = re.search(rf"^#define {name} (0x[0-9A-Fa-f]+|\d+)\b", text, re.MULTILINE)
        if found is None:
            raise ProxyRoutingError(None, f"{name} is not defined in consts.h")
        return int(found.group(1), 0)

    return ProxyConstants(value("CY_MARK_TO_PROXY"), value("CY_MARK_PROXY_MASK"), value("CY_PROXY_TABLE"))


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()  # flags=0: never create a netns
    try:
        yield ipr
    finally:
        ipr.close()


def ensure(netns: str | None, consts: ProxyConstants | None = None) -> None:
    """Install (idempotently) the rule and the local route in ``netns``."""
    c = consts or datapath_constants()
    try:
        with _ipr(netns) as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if not lo:
                raise ProxyRoutingError(netns, "no loopback device")
            ipr.link("set", index=lo[0], state="up")
            if not _has_rule(ipr, c):
                try:
                    ipr.rule("add", table=c.table, priority=RULE_PRIORITY, fwmark=c.mark, fwmask=c.mask)
                except NetlinkError as exc:
                    if exc.code != _EEXIST:
                        raise
            ipr.route("replace", dst="0.0.0.0/0", table=c.table, type="local", oif=lo[0], scope=254)
    except NetlinkError as exc:
        raise ProxyRoutingError(netns, str(exc)) from exc


def check(netns: str | None, consts: ProxyConstants | None = None) -> list[str]:
    """What is missing for redirection to work (empty: the rule and the route are in place)."""
    c = consts or datapath_constants()
    problems: list[str] = []
    try:
        with _ipr(netns) as ipr:
            if not _has_rule(ipr, c):
                problems.append(f"no ip rule fwmark {c.mark:#x}/{c.mask:#x} lookup {c.table}")
            routes = [r for r in ipr.get_routes(table=c.table) if r.get("type") == _RTN_LOCAL
                      and r.get("dst_len") == 0]
            if not routes:
                problems.append(f"no local default route in table {c.table}")
    except NetlinkError as exc:
        problems.append(f"cannot read routing of {netns or 'the current namespace'}: {exc}")
    return problems


def _has_rule(ipr: IPRoute, c: ProxyConstants) -> bool:
    for rule in ipr.get_rules(family=2):
        if rule.get_attr("FRA_TABLE") == c.table and rule.get_attr("FRA_FWMARK") == c.mark \
                and rule.get_attr("FRA_FWMASK") == c.mask:
            return True
    return False
