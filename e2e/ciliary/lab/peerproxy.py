"""The peer's kube-proxy (``ciliary lab up --kube-proxy [MODE]``): its modes, and the check before the lab starts.

With a mode set, the lab is the same lab with one switch flipped: the chart runs with Ciliary's load balancer off
in the agents and the operator, and every node namespace runs kube-proxy (``ciliary.lab.nodeservices``, built
from the Kubernetes wrapper module, ``--proxy-mode`` iptables or nftables) alone (``ciliary.lab.reallab``).
"""

from __future__ import annotations

from ciliary.lab import nodeservices
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
