"""The node-namespace plumbing that delivers redirected connections to the node's Envoy.

Owns :func:`ensure` (idempotent: creates what is missing, repairs what is wrong, removes what
an earlier configuration left, e.g. the TPROXY rule of a previous ``--proxy-port``, or a proxy
device re-created under another ifindex than the programs were rendered with),
:func:`check` (what is missing or wrong, as problems, ``proxy_routing``'s table included) and :func:`teardown` (everything
removed, for an agent running with ``--l7-proxy off``); ``proxy_plumbing_keeper`` re-checks
and repairs periodically. In the node's network namespace (``--netns``, or the agent's own)
the plumbing is

- the proxy device: a veth pair ``cy_l7h``/``cy_l7p``, both up, with reverse-path
  filtering off on ``cy_l7p``. ``cy_to_pod`` redirects a packet to ``cy_l7p``'s ingress
  with its destination MAC set to ``cy_l7p``'s (``datapath_c/lib/l7redirect.h``): the pair
  exists only to give the packet a device to re-enter the stack on (the lab's kernel has
  no dummy devices); nothing is sent through it. Its ifindex and MAC are rendered into the
  programs: a pair re-created later gets them back (``ip link add ... index``);
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
from pathlib import Path

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


MARK = f"0x{TO_PROXY_MARK:x}/0x{MARK_MASK:x}"
EARLY_DEMUX = "net.ipv4.ip_early_demux"


def _output(netns: str, argv: Sequence[str]) -> str:
    return subprocess.run(_in_netns(netns, argv), capture_output=True, text=True, timeout=20, check=False).stdout


def _device(netns: str) -> tuple[int, str, bool] | None:
    """(ifindex, MAC, up) of the proxy device; None when it does not exist."""
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        found = ipr.link_lookup(ifname=PROXY_DEVICE)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        return found[0], str(link.get_attr("IFLA_ADDRESS")).lower(), bool(link["flags"] & 1)  # IFF_UP
    except (NetlinkError, OSError, IndexError) as exc:
        raise PlumbingFailed(netns, "proxy device", str(exc)) from exc
    finally:
        ipr.close()


def _our_rules(netns: str) -> list[tuple[str, bool]]:
    """(priority, is the wanted rule) of every ``ip rule`` that looks up our table."""
    out = []
    for line in _output(netns, ["ip", "rule", "show", "table", str(ROUTE_TABLE)]).splitlines():
        prio, _, rest = line.partition(":")
        if prio.strip().isdigit():
            out.append((prio.strip(), prio.strip() == str(RULE_PRIORITY) and f"fwmark {MARK} " in rest + " "))
    return out


def _our_tproxy_rules(netns: str) -> list[list[str]]:
    """Every mangle PREROUTING TPROXY rule on the proxy device, as ``iptables -S`` prints it (without -A)."""
    out = []
    for line in _output(netns, ["iptables", "-w", "-t", "mangle", "-S", "PREROUTING"]).splitlines():
        words = line.split()
        if words[:1] == ["-A"] and f"-i {PROXY_DEVICE} " in line + " " and "-j TPROXY" in line:
            out.append(words[1:])
    return out


def _port_of(rule: Sequence[str]) -> int:
    return int(rule[rule.index("--on-port") + 1]) if "--on-port" in rule else 0


SYSCTL_NET_DIR = Path("/proc/sys/net")
"""The node's /proc/sys/net, writable: used when the agent runs in the node's own namespace (``netns``
empty); the agent sets it from ``--sysctl-net-dir`` (a container's /proc/sys is read-only: the chart mounts
the node's at /host/proc/sys/net). With ``netns`` set, ``ip netns exec ... sysctl`` is used."""


def _sysctl_file(name: str) -> Path:
    if not name.startswith("net."):
        raise ValueError(f"{name}: only network sysctls are written")
    return SYSCTL_NET_DIR.joinpath(*name.split(".")[1:])


def _sysctl(netns: str, name: str) -> str:
    if not netns:
        try:
            return _sysctl_file(name).read_text().strip()
        except OSError:
            return ""
    return _output(netns, ["sysctl", "-n", name]).strip()


def _set_sysctls(netns: str, step: str, values: dict[str, str], check: bool = True) -> None:
    if netns:
        _run(netns, step, ["sysctl", "-qw", *(f"{k}={v}" for k, v in values.items())], check=check)
        return
    for name, value in values.items():
        try:
            _sysctl_file(name).write_text(value)
        except OSError as exc:
            if check:
                raise PlumbingFailed(netns, step, f"{_sysctl_file(name)}: {exc}") from exc


def ensure(netns: str, port: int, device: ProxyDevice | None = None) -> ProxyDevice:
    """Create what is missing, repair what is wrong, remove what is stale; return the proxy device.

    ``device``: the device the programs were rendered with; a missing pair is re-created with its
    ifindex and MAC (so the programs need no re-render).
    """
    found = _device(netns)
    if found is not None and device is not None and found[0] != device.ifindex:
        # Re-created by someone else under another ifindex: the programs redirect to the rendered one.
        _run(netns, "proxy device", ["ip", "link", "del", PROXY_DEVICE])
        log.warning("Proxy device had another ifindex; re-creating it", extra={
            "netns": netns, "found": found[0], "rendered": device.ifindex})
        found = None
    if found is None and device is not None:
        _run(netns, "proxy device", ["ip", "link", "add", PROXY_DEVICE, "index", str(device.ifindex), "address",
                                     device.mac, "type", "veth", "peer", "name", HOST_END])
    elif found is None:
        _run(netns, "proxy device", ["ip", "link", "add", PROXY_DEVICE, "type", "veth", "peer", "name", HOST_END])
    found = _device(netns)
    if found is None:
        raise PlumbingFailed(netns, "proxy device", f"{PROXY_DEVICE} missing after creation")
    if device is not None and found[1] != device.mac:
        _run(netns, "proxy device", ["ip", "link", "set", PROXY_DEVICE, "address", device.mac])
    for name in (HOST_END, PROXY_DEVICE):
        _run(netns, "proxy device", ["ip", "link", "set", name, "up"])
    index, mac, _up = _device(netns) or (0, "", False)
    rules = _our_rules(netns)
    for prio, wanted in rules:
        if not wanted:
            _run(netns, "ip rule", ["ip", "rule", "del", "priority", prio, "table", str(ROUTE_TABLE)], check=False)
    wanted_count = sum(wanted for _p, wanted in rules)
    if wanted_count != 1:
        for _ in range(wanted_count):  # duplicates: remove all, add one
            _run(netns, "ip rule", ["ip", "rule", "del", "priority", str(RULE_PRIORITY), "table", str(ROUTE_TABLE)],
                 check=False)
        _run(netns, "ip rule", ["ip", "rule", "add", "fwmark", MARK, "lookup", str(ROUTE_TABLE),
                                "priority", str(RULE_PRIORITY)])
    _run(netns, "ip route", ["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)])
    _set_sysctls(netns, "sysctls", {f"net.ipv4.conf.{PROXY_DEVICE}.rp_filter": "0", EARLY_DEMUX: "0"})
    kept = False
    for rule in _our_tproxy_rules(netns):
        if _port_of(rule) == port and not kept:
            kept = True
            continue
        _run(netns, "iptables (stale rule)", ["iptables", "-w", "-t", "mangle", "-D", *rule])
        log.info("Stale proxy rule removed", extra={"netns": netns, "rule": " ".join(rule)})
    if not kept:
        _run(netns, "iptables", ["iptables", "-w", "-t", "mangle", "-A", *tproxy_rule(port)])
    for rule in egress_answer_rules():
        if _run(netns, "iptables check", ["iptables", "-w", "-t", "mangle", "-C", *rule], check=False) != 0:
            _run(netns, "iptables", ["iptables", "-w", "-t", "mangle", "-A", *rule])
    try:
        proxy_routing.ensure(netns or None)
    except (proxy_routing.ProxyRoutingError, OSError) as exc:
        raise PlumbingFailed(netns, "proxy routing", str(exc)) from exc
    log.info("Proxy plumbing ready", extra={"netns": netns, "device": PROXY_DEVICE, "ifindex": index,
                                            "port": port})
    return ProxyDevice(ifindex=index, mac=mac)


def check(netns: str, port: int, device: ProxyDevice | None) -> list[str]:
    """What of the plumbing for ``port`` (and the rendered ``device``) is missing or wrong; empty: all in place."""
    problems: list[str] = []
    found = _device(netns)
    if found is None:
        problems.append(f"no proxy device {PROXY_DEVICE}")
    else:
        index, mac, up = found
        if device is not None and (index, mac) != (device.ifindex, device.mac):
            problems.append(f"{PROXY_DEVICE} is ifindex {index} {mac}, the programs redirect to "
                            f"ifindex {device.ifindex} {device.mac}")
        if not up:
            problems.append(f"{PROXY_DEVICE} is down")
    rules = _our_rules(netns)
    if not any(wanted for _p, wanted in rules):
        problems.append(f"no ip rule fwmark {MARK} lookup {ROUTE_TABLE}")
    if any(not wanted for _p, wanted in rules):
        problems.append(f"stale ip rules looking up table {ROUTE_TABLE}")
    if "local default dev lo" not in _output(netns, ["ip", "route", "show", "table", str(ROUTE_TABLE)]):
        problems.append(f"no local default route in table {ROUTE_TABLE}")
    if _sysctl(netns, EARLY_DEMUX) != "0":
        problems.append(f"{EARLY_DEMUX} is not 0")
    tproxy = _our_tproxy_rules(netns)
    if not any(_port_of(rule) == port for rule in tproxy):
        problems.append(f"no TPROXY rule to port {port} in mangle PREROUTING")
    stale = sorted({_port_of(rule) for rule in tproxy if _port_of(rule) != port})
    if stale:
        problems.append(f"stale TPROXY rules to ports {', '.join(map(str, stale))}")
    for rule in egress_answer_rules():
        if _run(netns, "iptables check", ["iptables", "-w", "-t", "mangle", "-C", *rule], check=False) != 0:
            problems.append(f"no egress answer rule in mangle: {' '.join(rule[1:])}")
    try:
        problems += proxy_routing.check(netns or None)  # table 2005: how a pod's connection reaches Envoy
    except (proxy_routing.ProxyRoutingError, OSError) as exc:
        problems.append(str(exc))
    return problems


def teardown(netns: str) -> list[str]:
    """Remove every piece of the plumbing (L7 proxy off); what was removed, for the log and tests.

    ``ip_early_demux`` is set back to 1 (the kernel's default) only when something of the
    plumbing was still there: a node that never ran the proxy keeps its own setting.
    """
    removed: list[str] = []
    if _device(netns) is not None:
        _run(netns, "teardown", ["ip", "link", "del", PROXY_DEVICE], check=False)
        removed.append(f"device {PROXY_DEVICE}")
    for prio, _wanted in _our_rules(netns):
        _run(netns, "teardown", ["ip", "rule", "del", "priority", prio, "table", str(ROUTE_TABLE)], check=False)
        removed.append(f"ip rule {prio}")
    if _output(netns, ["ip", "route", "show", "table", str(ROUTE_TABLE)]).strip():
        _run(netns, "teardown", ["ip", "route", "flush", "table", str(ROUTE_TABLE)], check=False)
        removed.append(f"routes of table {ROUTE_TABLE}")
    for rule in _our_tproxy_rules(netns):
        _run(netns, "teardown", ["iptables", "-w", "-t", "mangle", "-D", *rule], check=False)
        removed.append(f"TPROXY rule to port {_port_of(rule)}")
    for rule in egress_answer_rules():
        for _ in range(8):  # duplicates too, bounded
            if _run(netns, "teardown", ["iptables", "-w", "-t", "mangle", "-D", *rule], check=False) != 0:
                break
            removed.append("egress answer rule")
    if removed and _sysctl(netns, EARLY_DEMUX) == "0":
        _set_sysctls(netns, "teardown", {EARLY_DEMUX: "1"}, check=False)
        removed.append(f"{EARLY_DEMUX}=0")
    if removed:
        log.info("Proxy plumbing removed (L7 proxy off)", extra={"netns": netns, "removed": removed})
    return removed
