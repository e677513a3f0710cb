"""The real kube-proxy as the process lab's Service proxy (``ciliary lab up --process --kube-proxy [MODE]``): the
peer (on real nodes, ``ciliary lab up --kube-proxy`` is ``reallab``'s).

With a mode set, the lab is the same lab with one switch flipped: the node agents run without
Ciliary's load balancer (no ``--lb-cgroup``, so neither the socket programs nor the north-south tc
programs are attached), the operator runs with ``--no-load-balancing`` (no Service intents), and every
node namespace runs kube-proxy (built from the Kubernetes wrapper module, ``--proxy-mode`` iptables or
nftables) as people run it: it watches Services and EndpointSlices through the node's apiserver relay
(the gateway, as on real nodes) and writes its rules into that node's namespace only.
"""

from __future__ import annotations

from collections.abc import Sequence

from ciliary.lab import controlplane, nodeservices, processes, realcluster
from ciliary.lab.layout import LabLayout
from ciliary.lab.nodebins import NodeBinaries
from ciliary.lab.tools import ToolMissingError, find

MODES = nodeservices.KUBE_PROXY_MODES
#: the system tool each mode writes its rules with
MODE_TOOLS = {"iptables": "iptables-restore", "nftables": "nft"}


class PeerProxyError(RuntimeError):
    """kube-proxy cannot run in this lab (unknown mode, binary or tool missing); carries the mode."""

    def __init__(self, mode: str, message: str) -> None:
        super().__init__(f"kube-proxy {mode}: {message}")
        self.mode = mode


def check(mode: str) -> None:
    """Refuse an unknown mode or a missing binary/tool before anything is started."""
    if mode not in MODES:
        raise PeerProxyError(mode, f"unknown mode (one of {', '.join(MODES)})")
    binary = NodeBinaries.discover().kube_proxy
    if not binary.exists():
        raise PeerProxyError(mode, f"{binary} not built: run setup/setup.sh")
    try:
        find(MODE_TOOLS[mode])
    except ToolMissingError as exc:
        raise PeerProxyError(mode, str(exc)) from exc


def start(layout: LabLayout, ports: controlplane.Ports, nodes: Sequence[str], mode: str) -> None:
    """The apiserver relay in every node namespace, then one kube-proxy per node (running ones are kept)."""
    check(mode)
    if not all(layout.node_netns(n) in _gateway_cmdline(layout) for n in nodes):
        realcluster.start_gateway(layout, ports, nodes)
    binary = NodeBinaries.discover().kube_proxy
    for node in nodes:
        nodeservices.start_kube_proxy(layout, binary, node, mode)


def _gateway_cmdline(layout: LabLayout) -> str:
    """The gateway's command line while it runs ('' otherwise): it binds its relays only at start."""
    pid = processes.running_pid(layout, realcluster.GATEWAY)
    if not pid:
        return ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
