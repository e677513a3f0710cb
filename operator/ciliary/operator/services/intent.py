"""The operator-to-agent wire schema of load balancing: what one node's socket load balancer holds.

The operator resolves Services into one :class:`NodeLBIntent` per node and publishes it as shards
under ``keyspace.node_lb_intent_prefix`` (``services.sharding``; readable by that node's agent
only); the agent assembles it back and fills its LB maps from it. A frontend is (address, port,
protocol): the same port on TCP and UDP is two frontends. A frontend's backends are final: the
traffic policy, the terminating fallback and this node's locality have been applied; an empty
tuple means "refuse" (no endpoints), or, with ``no_local_backends``, "drop" (a Local policy and
no endpoint on this node). A Service with ``externalTrafficPolicy: Local`` and a
``healthCheckNodePort`` also gets a :class:`HealthCheckIntent` on every node: the number of its
ready endpoints on that node, which the agent serves on that port as kube-proxy does.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import operator
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

LB_SCHEMA_VERSION = 6
"""4: stored as shards (``services.sharding``); values leave out fields at their defaults. 5: ``FrontendIntent.dsr``
(an agent of 4 would refuse a DSR frontend as malformed: it refuses the version instead, and keeps what it has).
6: shard values are zlib-compressed (an agent of 5 reads the manifest, plain JSON, and refuses version 6)."""
MAX_BACKENDS_PER_FRONTEND = 256
"""Backend slots of one frontend in the datapath (``CY_LB_SLOTS_MAX``); more is refused, never cut."""

PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}


class LBIntentSchemaError(ValueError):
    """A load-balancing intent this agent cannot apply (unknown schema version or malformed)."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"load-balancing intent for {node!r}: {message}")
        self.node = node
        self.message = message


class FrontendKind(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


class BackendState(StrEnum):
    READY = "ready"
    TERMINATING = "terminating"
    """Serving but terminating: used only when no backend of the set is ready."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@functools.lru_cache(maxsize=1 << 16)
def _check_ipv4(value: str) -> str:
    """The address in its normal form (cached: an agent parsing a shard checks ~600 addresses, mostly the same)."""
    return str(ipaddress.IPv4Address(value))


class BackendIntent(_Frozen):
    address: str = Field(description="Backend IPv4.")
    port: int = Field(ge=1, le=65535, description="Backend port (the targetPort resolved for its pod).")
    state: BackendState = Field(default=BackendState.READY, description="ready, or terminating (fallback).")
    node: str = Field(default="", description="Node the endpoint runs on, if known.")
    pod: str = Field(default="", description="namespace/name of the pod, if any.")

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        return _check_ipv4(value)


class FrontendIntent(_Frozen):
    """One (address, port, protocol) the datapath translates, with its backends in slot order."""

    service: str = Field(description="namespace/name of the Service.")
    port_name: str = Field(default="", description="Name of the Service port.")
    kind: FrontendKind = Field(description="ClusterIP, NodePort, ExternalIP or LoadBalancer.")
    address: str = Field(description="Frontend IPv4.")
    port: int = Field(ge=1, le=65535, description="Frontend port.")
    protocol: str = Field(description="TCP, UDP or SCTP.")
    backends: tuple[BackendIntent, ...] = Field(default=(), max_length=MAX_BACKENDS_PER_FRONTEND)
    traffic_policy: str = Field(default="Cluster", description="The traffic policy applied (Cluster or Local).")
    no_local_backends: bool = Field(default=False, description="Local policy, endpoints exist, none here: drop.")
    affinity_timeout: int = Field(default=0, ge=0, description="ClientIP session affinity seconds; 0: none.")
    dsr: bool = Field(default=False, description="Clients from outside reach backends on other nodes by direct "
                                                 "server return (the backend sees the client, its node answers "
                                                 "it); False: SNAT. Only for NodePort, ExternalIP and "
                                                 "LoadBalancer frontends.")
    source_ranges: tuple[str, ...] = Field(
        default=(), description="loadBalancerSourceRanges of a LoadBalancer frontend (CIDRs, IPv4 and IPv6): "
                                "clients from outside the node outside them are dropped; empty: no restriction.")

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        return _check_ipv4(value)

    @field_validator("source_ranges")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(item, strict=False)) for item in value)

    @field_validator("protocol")
    @classmethod
    def _proto(cls, value: str) -> str:
        if value not in PROTOCOL_NUMBERS:
            raise ValueError(f"protocol {value!r} is not one of {', '.join(PROTOCOL_NUMBERS)}")
        return value

    @property
    def key(self) -> FrontendKey:
        return frontend_key(self)


FrontendKey = tuple[str, int, str]
"""A frontend's identity in the maps: address, port, protocol."""
frontend_key = operator.attrgetter("address", "port", "protocol")
"""``FrontendIntent.key`` as one C call (loops over 10,000 frontends: about a third of the property's cost)."""


class ProblemIntent(_Frozen):
    """A Service problem, carried so ``ciliary service list`` shows it next to the frontends."""

    service: str
    reason: str
    message: str


class HealthCheckIntent(_Frozen):
    """A ``healthCheckNodePort`` this node answers: 200 with local endpoints, 503 without."""

    service: str = Field(description="namespace/name of the Service.")
    port: int = Field(ge=1, le=65535, description="The Service's healthCheckNodePort.")
    local_endpoints: int = Field(ge=0, description="Ready endpoints of the Service on this node.")


class NodeLBIntent(_Frozen):
    schema_version: int = Field(default=LB_SCHEMA_VERSION)
    node: str
    frontends: tuple[FrontendIntent, ...] = ()
    health_checks: tuple[HealthCheckIntent, ...] = ()
    problems: tuple[ProblemIntent, ...] = ()

    def content_hash(self) -> str:
        data = self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def to_wire(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def parse_lb_intent(node: str, raw: bytes | str | Mapping[str, Any]) -> NodeLBIntent:
    try:
        data = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
    except json.JSONDecodeError as exc:
        raise LBIntentSchemaError(node, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LBIntentSchemaError(node, "not a JSON object")
    if data.get("schema_version") != LB_SCHEMA_VERSION:
        raise LBIntentSchemaError(node, f"unknown schema version {data.get('schema_version')!r} "
                                        f"(this agent speaks {LB_SCHEMA_VERSION})")
    try:
        return NodeLBIntent.model_validate(data)
    except ValueError as exc:
        raise LBIntentSchemaError(node, str(exc)) from exc
