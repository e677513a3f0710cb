"""The node-namespace plumbing that delivers redirected connections to the node's Envoy.

Owns :func:`ensure` (idempotent; run once at agent start, before the datapath renders):
in the node's network namespace (``--netns``, or the agent's own) it creates

- the proxy device: a veth pair ``cy_l7h``/``cy_l7p``, both up, with reverse-path
  filtering off on ``cy_l7p``. ``cy_to_pod`` redirects a packet to ``cy_l7p``'s ingress
  with its destination MAC set to ``cy_l7p``'s (``datapath_c/lib/l7redirect.h``): the pair
  exists only to give the packet a device to re-enter the stack on (the lab's kernel has
  no dummy devices); nothing is sent through it;
- an iptables ``mangle PREROUTING`` rule: TCP arriving on ``cy_l7p`` with mark
  ``TO_PROXY_MARK`` is handed (TPROXY) to the transparent listener on the proxy port,
  which Envoy finds by the packet's original destination;
- policy routing: ``ip rule fwmark TO_PROXY_MARK/MARK_MASK lookup 2012`` and
  ``local 0.0.0.0/0 dev lo`` in table 2012, so a marked packet is delivered locally
  whatever its destination address;
- for the egress listener, whose upstream connections leave from the client pod's address with
  socket mark ``FROM_EGRESS_PROXY_MARK``: two iptables ``mangle PREROUTING`` rules. An
  unmarked packet that belongs to such an established transparent socket takes the socket's
  mark (``-m socket --transparent --nowildcard --restore-skmark``), and that mark becomes
  ``TO_PROXY_MARK``, which the table-2012 rule delivers locally. Without them an answer
  addressed to the pod would be forwarded to the pod instead of Envoy. (A routing rule on
  ``FROM_EGRESS_PROXY_MARK`` itself would also send the upstream connection's own outgoing
  packets to ``lo``.) The policy routing of ``lib/redirect.h`` (table 2005,
  ``proxy_routing``) is ensured too: the pod's connection reaches the egress listener through
  it, also on a node without a DNS proxy;
- ``net.ipv4.ip_early_demux=0`` (a per-namespace switch): Envoy's accepted sockets carry the
  pod's address, so with early demux every later packet of the connection, arriving on the
  node's eth0 or a client pod's veth on its way to the pod, would be matched to Envoy's socket
  before routing and then dropped by the forwarding path (which refuses a packet that already
  has a socket) instead of reaching the pod's veth and being redirected (seen in the lab:
  handshakes stuck in SYN-RECV). The cost is one routing lookup per received packet.

Why TPROXY and not ``bpf_sk_assign``: ``cy_to_pod`` runs at tc egress, where a socket
cannot be assigned, so a second program on the proxy device's ingress would be needed;
the iptables rule does the same job with the kernel's own socket lookup (established
connections first, then the listener) and no extra program.

Never touches the root namespace unless the agent runs there (real nodes).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ciliary.nodeagent import proxy_routing
from ciliary.nodeagent.envoy_config import FROM_EGRESS_PROXY_MARK, MARK_MASK, TO_PROXY_MARK

log = logging.getLogger(__name__)

HOST_END = "cy_l7h"
PROXY_DEVICE = "cy_l7p"
ROUTE_TABLE = 2012
RULE_PRIORITY = 2012


class PlumbingFailed(RuntimeError):
    """The proxy device, rule or route could not be set up in ``netns``."""

    def __init__(self, netns: str, step: str, detail: str) -> None:
        super().__init__(f"proxy plumbing in {netns or 'own namespace'}: {step}: {detail}")
        self.netns = netns
        self.step = step


@dataclasses.dataclass(frozen=True)
class ProxyDevice:
    ifindex: int
    mac: str


def _in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def _run(netns: str, step: str, argv: Sequence[str], check: bool = True) -> int:
    proc = subprocess.run(_in_netns(netns, argv), capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        raise PlumbingFailed(netns, step, (proc.stderr or proc.stdout).strip())
    return proc.returncode


def tproxy_rule(port: int) -> list[str]:
    """The mangle PREROUTING rule (without the -A/-C/-D verb)."""
    mark = f"0x{TO_PROXY_MARK:x}/0x{MARK_MASK:x}"
    return ["PREROUTING", "-i", PROXY_DEVICE, "-p", "tcp", "-m", "mark", "--mark", mark,
            "-j", "TPROXY", "--on-port", str(port), "--tproxy-mark", mark]


def egress_answer_rules() -> list[list[str]]:
    """The mangle PREROUTING rules (without the -A/-C/-D verb) that route answers to the egress listener's
    upstream sockets to Envoy, in order."""
    unmarked = ["-m", "mark", "--mark", f"0/0x{MARK_MASK:x}"]
    egress = f"0x{FROM_EGRESS_PROXY_MARK:x}/0x{MARK_MASK:x}"
    return [["PREROUTING", *unmarked, "-m", "socket", "--transparent", "--nowildcard", "--restore-skmark"],
            ["PREROUTING", "-m", "mark", "--mark", egress, "-j", "MARK", "--set-xmark",
             f"0x{TO_PROXY_MARK:x}/0x{MARK_MASK:x}"]]


def ensure(netns: str, port: int) -> ProxyDevice:
    """Create what is missing; return the proxy device's ifindex and MAC."""
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        if not ipr.link_lookup(ifname=PROXY_DEVICE):
            ipr.link("add", ifname=HOST_END, kind="veth", peer=PROXY_DEVICE)
        for name in (HOST_END, PROXY_DEVICE):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        index = ipr.link_lookup(ifname=PROXY_DEVICE)[0]
        mac = str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")).lower()
    except (NetlinkError, OSError, IndexError) as exc:
        raise PlumbingFailed(netns, "proxy device", str(exc)) from exc
    finally:
        ipr.close()
    mark = f"0x{TO_PROXY_MARK:x}/0x{MARK_MASK:x}"
    rules = subprocess.run(_in_netns(netns, ["ip", "rule", "show", "table", str(ROUTE_TABLE)]),
                           capture_output=True, text=True, timeout=20, check=False).stdout
    if "fwmark" not in rules:
        _run(netns, "ip rule", ["ip", "rule", "add", "fwmark", mark, "lookup", str(ROUTE_TABLE),
                                "priority", str(RULE_PRIORITY)])
    _run(netns, "ip route", ["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)])
    _run(netns, "sysctls", ["sysctl", "-qw", f"net.ipv4.conf.{PROXY_DEVICE}.rp_filter=0",
                            "net.ipv4.ip_early_demux=0"])
    for rule in (tproxy_rule(port), *egress_answer_rules()):
        if _run(netns, "iptables check", ["iptables", "-w", "-t", "mangle", "-C", *rule], check=False) != 0:
            _run(netns, "iptables", ["iptables", "-w", "-t", "mangle", "-A", *rule])
    try:
        proxy_routing.ensure(netns or None)
    except (proxy_routing.ProxyRoutingError, OSError) as exc:
        raise PlumbingFailed(netns, "proxy routing", str(exc)) from exc
    log.info("Proxy plumbing ready", extra={"netns": netns, "device": PROXY_DEVICE, "ifindex": index,
                                            "port": port})
    return ProxyDevice(ifindex=index, mac=mac)
