"""The node's kernel's rate limits on ICMP errors (``net.ipv4.icmp_*``), which the north-south refusals keep to.

kube-proxy answers a UDP datagram to a Service without endpoints with an iptables REJECT; the kernel
sends that ICMP port unreachable only within its own limits. The north-south programs build the
answer themselves (``lib/lb_reject.h``), so ``lib/lb_icmp_budget.h`` applies the same limits with the
node's values, which :func:`read` takes from the node and ``programs/lb_macros.j2`` renders:

- ``icmp_ratemask``: the ICMP types limited at all (destination unreachable, type 3, by default);
- ``icmp_ratelimit``: per client, one message every that many milliseconds after a burst of six
  (0: no per-client limit);
- ``icmp_msgs_per_sec`` and ``icmp_msgs_burst``: node-wide.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

DESTINATION_UNREACHABLE = 3
SYSCTLS = ("icmp_ratemask", "icmp_ratelimit", "icmp_msgs_per_sec", "icmp_msgs_burst")
"""Under ``net.ipv4``; each network namespace has its own."""
PROC_IPV4 = Path("/proc/sys/net/ipv4")


@dataclasses.dataclass(frozen=True)
class IcmpLimits:
    """The limits as rendered; the defaults are the kernel's."""

    port_unreachable_limited: bool = True
    peer_interval_ms: int = 1000
    per_second: int = 1000
    burst: int = 50


def from_sysctls(values: Mapping[str, str]) -> IcmpLimits:
    """The limits from the sysctls' text (a missing or unreadable one keeps the kernel's default)."""
    default = IcmpLimits()

    def number(name: str, fallback: int) -> int:
        try:
            return max(0, int(values.get(name, "").strip()))
        except ValueError:
            return fallback

    mask = number("icmp_ratemask", 0x1818)
    return IcmpLimits(port_unreachable_limited=bool(mask & (1 << DESTINATION_UNREACHABLE)),
                      peer_interval_ms=number("icmp_ratelimit", default.peer_interval_ms),
                      per_second=number("icmp_msgs_per_sec", default.per_second),
                      burst=number("icmp_msgs_burst", default.burst))


def read(netns: str | None) -> IcmpLimits:
    """The limits of ``netns`` (None or "": the agent's own network namespace, the node's on a real node)."""
    values: dict[str, str] = {}
    if netns:
        proc = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-n", *(f"net.ipv4.{n}" for n in SYSCTLS)],
                              capture_output=True, text=True, timeout=10)
        lines = proc.stdout.splitlines()
        if proc.returncode == 0 and len(lines) == len(SYSCTLS):
            values = dict(zip(SYSCTLS, lines, strict=True))
    else:
        for name in SYSCTLS:
            try:
                values[name] = (PROC_IPV4 / name).read_text()
            except OSError:
                pass
    missing = [n for n in SYSCTLS if n not in values]
    if missing:
        log.warning("ICMP rate limits not read: the kernel's defaults apply",
                    extra={"netns": netns or "", "missing": missing})
    return from_sysctls(values)
