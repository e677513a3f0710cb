"""The kube-proxy bench's pure parts: the Services and EndpointSlices it creates, sizes, ratios, the table.

Every bench Service is selector-less with a fixed ClusterIP (so the frontends to probe are known before
anything is created) and one port ``http`` 80/TCP; its EndpointSlice (``kubernetes.io/service-name``)
lists the backend pods' addresses with port ``http`` = the backends' port. The same objects reach both
proxies: Ciliary's operator and kube-proxy read Services and EndpointSlices from the apiserver alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: bulk Services take ClusterIPs from here (inside the lab's 10.96.0.0/16); the apiserver hands out
#: addresses of this range to Services that ask for none too, so a run starts at the first window of its
#: size that no Service holds (:func:`free_window`)
BULK_BASE = ipaddress.IPv4Address("10.96.64.0")
BULK_MAX = 49151  # 10.96.64.0 .. 10.96.255.254 (the range's last address is its broadcast, never a ClusterIP)
#: the Service the rate tests go through (ClusterIP + NodePort) and the few fillers beside it: in the
#: range's lowest 256 addresses, which the apiserver keeps for Services that name their ClusterIP (it
#: allocates there only when the rest of the range is full)
RATE_IP = "10.96.0.200"
FILLER_BASE = ipaddress.IPv4Address("10.96.0.210")
SERVICE_PORT = 80
MANAGED_BY = "bench.ciliary.io"
DEFAULT_SIZES = (1000, 5000, 10000)


class SizeError(ValueError):
    """``--services`` is not a list of positive counts the address range holds; carries the text."""

    def __init__(self, text: str, message: str) -> None:
        super().__init__(f"--services {text!r}: {message}")
        self.text = text


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1000,5000,10000"`` -> (1000, 5000, 10000), ascending, each 1..BULK_MAX."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SizeError(text, "not a comma-separated list of numbers") from None
    if not sizes:
        raise SizeError(text, "no size given")
    if sizes[0] < 1 or sizes[-1] > BULK_MAX:
        raise SizeError(text, f"each size must be 1..{BULK_MAX}")
    return tuple(sizes)


def bulk_ip(index: int) -> str:
    if not 0 <= index < BULK_MAX:
        raise IndexError(f"bulk Service {index} outside 0..{BULK_MAX - 1}")
    return str(BULK_BASE + index)


def service(name: str, namespace: str, cluster_ip: str, target_port: int, *,
            node_port: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip, "type": "NodePort" if node_port else "ClusterIP",
        "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": target_port}]}
    if node_port:
        spec["ports"][0]["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def endpoint_slice(service_name: str, namespace: str, backends: Sequence[tuple[str, str]], port: int) -> dict[str, Any]:
    """One slice for ``service_name``: ``backends`` are (pod IP, node name), all ready, port ``http``."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-bench", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": node} for ip, node in backends],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}


def bulk_objects(count: int, namespace: str, backends: Sequence[tuple[str, str]],
                 port: int, first: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``count`` (Service, EndpointSlice) pairs ``svc-<i>`` on ``bulk_ip(i)``, ``i`` from ``first``."""
    return [(service(f"svc-{i}", namespace, bulk_ip(i), port), endpoint_slice(f"svc-{i}", namespace, backends, port))
            for i in range(first, first + count)]


def free_window(taken: set[str], count: int) -> int:
    """The first index ``i`` such that ``bulk_ip(i) .. bulk_ip(i + count - 1)`` are all free of ``taken``
    (ClusterIPs Services hold already). Pure."""
    held = sorted(int(ipaddress.IPv4Address(ip)) - int(BULK_BASE) for ip in taken
                  if ip and ip != "None" and 0 <= int(ipaddress.IPv4Address(ip)) - int(BULK_BASE) < BULK_MAX)
    first = 0
    for index in held:
        if index >= first + count:
            break
        first = max(first, index + 1)
    if first + count > BULK_MAX:
        raise SizeError(str(count), f"no {count} free addresses in a row from {BULK_BASE} (Services hold {len(held)})")
    return first


def filler_ip(index: int) -> str:
    return str(FILLER_BASE + index)


@dataclass(frozen=True)
class Figure:
    """One measured value of one proxy, with the machine's 1-minute load average when it was taken."""

    value: float | None  # None: not measured (the error says why)
    load: float
    error: str = ""


def ratio(ours: Figure, peer: Figure, *, lower_is_better: bool) -> float | None:
    """How many times better Ciliary is (> 1: better): peer/ours for times and memory, ours/peer for rates."""
    if ours.value is None or peer.value is None or ours.value <= 0 or peer.value <= 0:
        return None
    return peer.value / ours.value if lower_is_better else ours.value / peer.value


def show(fig: Figure | None, unit: str) -> str:
    if fig is None:
        return "-"
    if fig.value is None:
        return f"failed ({fig.error})" if fig.error else "failed"
    number = f"{fig.value:,.0f}" if fig.value >= 100 else f"{fig.value:.2f}"
    return f"{number}{unit} (load {fig.load:.0f})"


def show_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: Sequence[tuple[str, str, bool, dict[str, Figure]]], peers: Sequence[str]) -> str:
    """Rows (what, unit, lower_is_better, {proxy: figure}) -> a fixed-width table, Ciliary first, then
    each peer with the ratio "Ciliary is N x better" next to it."""
    head = ["what", "ciliary"] + [p for peer in peers for p in (peer, f"vs {peer}")]
    lines = [head]
    for what, unit, lower, figures in rows:
        ours = figures.get("ciliary")
        line = [what, show(ours, unit)]
        for peer in peers:
            theirs = figures.get(peer)
            line += [show(theirs, unit),
                     show_ratio(ratio(ours, theirs, lower_is_better=lower) if ours and theirs else None)]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)
