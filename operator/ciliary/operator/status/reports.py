"""What agents report back through etcd: per-node status and per-(policy, node) enforcement.

Agents write these under their lease (``keyspace.report_key`` and
``keyspace.node_status_key``), so a dead agent's reports vanish within the lease
TTL. In handover mode the operator turns ``PolicyReport``s into each policy's
``.status.nodes.<node>`` (field names as Cilium's: ok, enforcing, error,
lastUpdated, localPolicyRevision, annotations). Wire names are camelCase.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

REPORT_SCHEMA_VERSION = 1


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, alias_generator=to_camel)

    def to_wire(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True,
                          separators=(",", ":")).encode()


class PolicyReport(_Wire):
    """How one node enforces one policy."""

    schema_version: int = Field(default=REPORT_SCHEMA_VERSION, description="Wire schema version.")
    node: str = Field(description="Reporting node.")
    policy_uid: str = Field(description="metadata.uid of the policy.")
    kind: Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"] = Field(
        description="Policy kind.")
    namespace: str = Field(default="", description="Namespace of a CNP; empty for a CCNP.")
    name: str = Field(description="Policy name.")
    generation: int = Field(default=0, description="metadata.generation of the policy the node enforces.")
    ok: bool = Field(description="The node applied the policy without error.")
    enforcing: bool = Field(description="The policy is enforced in the node's datapath.")
    error: str = Field(default="", description="Why the node could not enforce it, if it could not.")
    last_updated: str = Field(description="RFC 3339 time of this report.")
    local_policy_revision: int = Field(description="Intent revision the node applied.")
    annotations: Mapping[str, str] = Field(default_factory=dict, description="Free-form details.")


class NodeStatusReport(_Wire):
    """The agent's overall state on one node."""

    schema_version: int = Field(default=REPORT_SCHEMA_VERSION, description="Wire schema version.")
    node: str = Field(description="Node name.")
    applied_revision: int = Field(description="Intent revision in force in the datapath.")
    enforcing: bool = Field(description="The datapath is loaded and enforcing.")
    error: str = Field(default="", description="Last error (verifier rejection, map full, bad intent).")
    program_hashes: Mapping[str, str] = Field(default_factory=dict, description="hook -> rendered source sha256.")
    endpoints: int = Field(default=0, description="Endpoints on the node.")
    last_updated: str = Field(description="RFC 3339 time of this report.")


def parse_policy_report(raw: bytes | str | Mapping[str, Any]) -> PolicyReport:
    data = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
    return PolicyReport.model_validate(data)


def parse_node_status(raw: bytes | str | Mapping[str, Any]) -> NodeStatusReport:
    data = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
    return NodeStatusReport.model_validate(data)


def status_nodes_entry(report: PolicyReport) -> dict[str, Any]:
    """The ``.status.nodes.<node>`` value Cilium users know."""
    entry: dict[str, Any] = {
        "ok": report.ok,
        "enforcing": report.enforcing,
        "lastUpdated": report.last_updated,
        "localPolicyRevision": report.local_policy_revision,
    }
    if report.error:
        entry["error"] = report.error
    if report.annotations:
        entry["annotations"] = dict(report.annotations)
    return entry
