"""Typed problems of one Service: each becomes a Warning Event on it and a line in ``ciliary service list``.

A problem never affects another Service: resolution leaves out only the frontends it concerns
(never a silently narrowed or widened backend set).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceProblem(Exception):
    """Base: a Service (``namespace/name``) that cannot be load-balanced (in part) as written."""

    namespace: str
    name: str
    reason: str
    """Event reason, CamelCase."""
    message: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}: {self.message}"


def target_port_unresolved(namespace: str, name: str, port: str, target: str, pods: list[str]) -> ServiceProblem:
    """``targetPort`` names a container port that some selected pods do not declare."""
    shown = ", ".join(sorted(pods)[:5]) + (f" and {len(pods) - 5} more" if len(pods) > 5 else "")
    return ServiceProblem(namespace, name, "TargetPortUnresolved",
                          f"port {port}: targetPort {target!r} names no container port of pod(s) {shown}; "
                          f"they get no traffic on this port")


def node_port_out_of_range(namespace: str, name: str, port: str, node_port: int, low: int, high: int) -> ServiceProblem:
    """A ``nodePort`` outside the range this proxy serves: its NodePort frontends are not installed."""
    return ServiceProblem(namespace, name, "NodePortOutOfRange",
                          f"port {port}: nodePort {node_port} is outside the NodePort range {low}-{high}; "
                          f"its NodePort frontends are not installed")


def forwarding_mode_invalid(namespace: str, name: str, value: str, default: str) -> ServiceProblem:
    """A ``service.cilium.io/forwarding-mode`` that is neither ``dsr`` nor ``snat``: the node-wide mode applies."""
    return ServiceProblem(namespace, name, "ForwardingModeInvalid",
                          f"annotation service.cilium.io/forwarding-mode {value!r} is not 'dsr' or 'snat'; "
                          f"the operator's --lb-mode ({default}) applies")


def sctp_from_outside_not_served(namespace: str, name: str, port: str, kinds: list[str]) -> ServiceProblem:
    """An SCTP port with frontends clients outside the cluster would use: the nodes' north-south programs pass
    SCTP untouched (not built), so only pods and the nodes' own processes are load-balanced to them."""
    return ServiceProblem(namespace, name, "SCTPFromOutsideNotServed",
                          f"port {port}: SCTP {', '.join(kinds)} frontends serve pods and the nodes' own processes "
                          f"only; SCTP from outside the cluster is not load-balanced by Ciliary")


def too_many_backends(namespace: str, name: str, port: str, count: int, limit: int) -> ServiceProblem:
    """More backends than a frontend's slots hold: the frontend is not installed (never a subset)."""
    return ServiceProblem(namespace, name, "TooManyBackends",
                          f"port {port}: {count} backends exceed the {limit} a frontend holds; "
                          f"its frontends are not installed")
