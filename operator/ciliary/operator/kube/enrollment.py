"""Whether a node's etcd-certificate request may be signed: the rule of per-node enrollment.

The agent pod's ``etcd-enroll`` init container (``ciliary.nodeagent.enroll``) creates a Kubernetes
CertificateSigningRequest with ``signerName`` :data:`SIGNER_NAME` for CN ``access.node_user(node)``;
the operator pod's ``etcd-enroller`` sidecar (``kube.enroller``) signs it only when :func:`decide`
approves (see charts/ciliary/README.md, "Per-node credentials"). Pure: it sees the CSR's fields and the subject its shell
parsed out of ``spec.request``, and says yes or no with the reason.

The rule: the requester is the agent's ServiceAccount; its bound token names the node it runs
on (``extra["authentication.kubernetes.io/node-name"]``, set since Kubernetes 1.30); the
requested CN is exactly that node's etcd user; the certificate is for client authentication
only and names no other identity (no SANs, no organisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ciliary.operator.store import access

SIGNER_NAME = "ciliary.io/etcd-node"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
ALLOWED_USAGES = frozenset({"client auth", "digital signature", "key encipherment"})


@dataclass(frozen=True)
class NodeCertificateRequest:
    """The fields of a CertificateSigningRequest the decision looks at."""

    name: str
    signer_name: str
    username: str
    extra: Mapping[str, Sequence[str]]
    usages: Sequence[str]
    subject_cn: str
    subject_has_other_fields: bool
    """O, OU or any other subject attribute besides CN."""
    san_count: int


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str
    node: str | None = None


def decide(request: NodeCertificateRequest, *, agent_service_account: str) -> Decision:
    """Approve only the agent ServiceAccount asking for its own node's etcd user; otherwise say why not.

    ``agent_service_account`` is ``system:serviceaccount:<namespace>:<name>``.
    """
    if request.signer_name != SIGNER_NAME:
        return Decision(False, f"signer {request.signer_name!r} is not {SIGNER_NAME}")
    if request.username != agent_service_account:
        return Decision(False, f"requested by {request.username!r}, not the agent ServiceAccount")
    nodes = list(request.extra.get(NODE_NAME_EXTRA, ()))
    if len(nodes) != 1 or not nodes[0]:
        return Decision(False, "the requester's token is not bound to exactly one node")
    node = nodes[0]
    try:
        wanted = access.node_user(node)
    except access.NodeNameError as exc:
        return Decision(False, str(exc))
    if request.subject_cn != wanted:
        return Decision(False, f"CN {request.subject_cn!r} is not {wanted!r}, the etcd user of node {node!r}")
    if request.subject_has_other_fields or request.san_count:
        return Decision(False, "the request names more than its CN (subject fields or SANs)")
    extra_usages = sorted(set(request.usages) - ALLOWED_USAGES)
    if "client auth" not in request.usages or extra_usages:
        return Decision(False, f"usages must be client auth only (got {sorted(request.usages)})")
    return Decision(True, f"agent on node {node} asks for its own etcd user", node=node)
