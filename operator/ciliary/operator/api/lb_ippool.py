"""CiliumLoadBalancerIPPool (``cilium.io/v2``, also served as ``v2alpha1``): the pool of LoadBalancer IPs (data only).

Owns the wire models of a pool's spec and :func:`parse_pool`, which turns a pool body into a validated
:class:`LBIPPool` or raises :class:`PoolInvalidError` naming the pool and the field. What the blocks
*mean* (which addresses, which Services, who gets which) belongs to ``ciliary.operator.services.lb_ipam``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ciliary.operator.api.base import WireModel
from ciliary.operator.api.selectors import LabelSelector

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IPBlock(WireModel):
    """One block: a CIDR, or a range from ``start`` to ``stop`` (``start`` alone: that one address)."""

    cidr: str | None = None
    start: str | None = None
    stop: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> IPBlock:
        if (self.cidr is None) == (self.start is None):
            raise ValueError("a block has either cidr or start (and optionally stop), not both or neither")
        if self.stop is not None and self.start is None:
            raise ValueError("stop needs start")
        if self.cidr is not None:
            ipaddress.ip_network(self.cidr, strict=False)
        else:
            first = ipaddress.ip_address(self.start or "")
            last = ipaddress.ip_address(self.stop) if self.stop is not None else first
            if first.version != last.version or last < first:  # type: ignore[operator]
                raise ValueError(f"range {self.start}-{self.stop} is empty or mixes families")
        return self

    def bounds(self, allow_first_last: bool) -> tuple[IPAddress, IPAddress]:
        """First and last allocatable address (a CIDR without its first and last unless allowed or /31-/32)."""
        if self.cidr is not None:
            net = ipaddress.ip_network(self.cidr, strict=False)
            first, last = net.network_address, net.broadcast_address
            if not allow_first_last and net.num_addresses > 2:
                return first + 1, last - 1
            return first, last
        first = ipaddress.ip_address(self.start or "")
        return first, ipaddress.ip_address(self.stop) if self.stop is not None else first


class LBIPPoolSpec(WireModel):
    blocks: tuple[IPBlock, ...] = Field(default=(), description="The pool's addresses.")
    allow_first_last_i_ps: Literal["Yes", "No"] | None = Field(
        default=None, alias="allowFirstLastIPs",
        description="Whether a CIDR's first and last address are allocatable (unset: Yes).")
    service_selector: LabelSelector | None = Field(default=None, description="Services that may get its IPs.")
    disabled: bool | None = Field(default=None, description="No new allocations (existing ones stay); unset: false.")


@dataclass(frozen=True)
class LBIPPool:
    """A validated pool: its name, creation time (older pools win conflicts) and spec."""

    name: str
    created: str
    spec: LBIPPoolSpec


class PoolInvalidError(ValueError):
    def __init__(self, pool: str, message: str) -> None:
        super().__init__(f"CiliumLoadBalancerIPPool {pool}: {message}")
        self.pool = pool
        self.message = message


def parse_pool(body: Mapping[str, Any]) -> LBIPPool:
    meta = body.get("metadata") or {}
    name = str(meta.get("name", ""))
    try:
        spec = LBIPPoolSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise PoolInvalidError(name, f"spec.{where}: {first['msg']}") from exc
    return LBIPPool(name=name, created=str(meta.get("creationTimestamp", "")), spec=spec)
