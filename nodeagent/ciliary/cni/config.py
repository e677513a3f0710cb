"""The network configuration the runtime passes on stdin, parsed once into a model.

Shape (what a node's ``/etc/cni/net.d`` file contains)::

    {
      "cniVersion": "1.0.0",            # one of SUPPORTED_VERSIONS
      "name": "ciliary",                # network name
      "type": "ciliary-cni",            # the executable the runtime looked up in CNI_PATH
      "mtu": 1500,                      # optional, 68..65535, set on both veth ends
      "ipam": {
        "type": "host-local-ciliary",   # the built-in allocator (no delegation)
        "subnet": "10.244.1.0/24",      # this node's pod CIDR, IPv4, prefix <= 30
        "dataDir": "/var/lib/cni/networks/ciliary"   # optional; default /var/lib/cni/networks/<name>
      },
      "agentSocket": "/run/ciliary/agent.sock"       # optional; the node agent's endpoint API
    }

Unknown fields are ignored, as the CNI convention asks (runtimes add keys such as
``runtimeConfig``, ``prevResult`` or ``args``). ``prevResult`` is kept for CHECK.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Literal

import pydantic

from ciliary.cni import errors

#: Versions this plugin speaks; results for all of them share one shape except
#: that pre-1.0.0 results carry ``"version": "4"`` in each ``ips`` entry.
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_VERSION = "1.0.0"
DEFAULT_DATA_ROOT = Path("/var/lib/cni/networks")
DEFAULT_AGENT_SOCKET = Path("/run/ciliary/agent.sock")


class IpamConfig(pydantic.BaseModel):
    """The ``ipam`` section: one IPv4 pod CIDR, allocations kept in ``dataDir``."""

    model_config = pydantic.ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    type: Literal["host-local-ciliary"] = pydantic.Field(description="Only the built-in allocator exists.")
    subnet: IPv4Network = pydantic.Field(description="The node's pod CIDR (host bits must be zero).")
    data_dir: Path | None = pydantic.Field(
        default=None, alias="dataDir", description="Allocation directory; default /var/lib/cni/networks/<name>."
    )

    @pydantic.field_validator("subnet")
    @classmethod
    def _has_room(cls, subnet: IPv4Network) -> IPv4Network:
        if subnet.prefixlen > 30:
            raise ValueError(f"subnet {subnet} is too small: a prefix of at most /30 is needed")
        return subnet


class NetworkConfig(pydantic.BaseModel):
    """The whole network configuration read from stdin."""

    model_config = pydantic.ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    cni_version: str = pydantic.Field(alias="cniVersion")
    name: str = pydantic.Field(min_length=1)
    type: str = pydantic.Field(min_length=1)
    mtu: int = pydantic.Field(default=1500, ge=68, le=65535)
    ipam: IpamConfig
    agent_socket: Path = pydantic.Field(default=DEFAULT_AGENT_SOCKET, alias="agentSocket")
    prev_result: dict[str, Any] | None = pydantic.Field(default=None, alias="prevResult")

    @property
    def data_dir(self) -> Path:
        return self.ipam.data_dir or DEFAULT_DATA_ROOT / self.name


def load_json(raw: bytes) -> dict[str, Any]:
    """Decode stdin; code 6 when it is not a JSON object."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.CniError(
            errors.ErrorCode.DECODING_FAILURE, "Failed to decode the network configuration", str(exc)
        ) from exc
    if not isinstance(document, dict):
        raise errors.CniError(
            errors.ErrorCode.DECODING_FAILURE, "The network configuration is not a JSON object", repr(document)[:200]
        )
    return document


def requested_version(document: dict[str, Any]) -> str:
    """The ``cniVersion`` the runtime asked for, or the default when it is absent or odd."""
    version = document.get("cniVersion")
    return version if isinstance(version, str) and version else DEFAULT_VERSION


def parse_network_config(raw: bytes) -> NetworkConfig:
    """Parse and validate stdin: code 6 (not JSON), 1 (version), 7 (invalid)."""
    document = load_json(raw)
    version = document.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise errors.CniError(
            errors.ErrorCode.INCOMPATIBLE_VERSION,
            f"Incompatible CNI version {version!r}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    try:
        return NetworkConfig.model_validate(document)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise errors.CniError(
            errors.ErrorCode.INVALID_NETWORK_CONFIG, "Invalid network configuration", problems
        ) from exc
