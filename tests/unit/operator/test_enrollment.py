"""The per-node etcd enrollment rule (``kube.enrollment.decide``): every way a request is refused."""

from __future__ import annotations

import dataclasses

import pytest

from ciliary.operator.kube.enrollment import NODE_NAME_EXTRA, SIGNER_NAME, NodeCertificateRequest, decide

AGENT = "system:serviceaccount:kube-system:ciliary-agent"
GOOD = NodeCertificateRequest(
    name="csr-1", signer_name=SIGNER_NAME, username=AGENT, extra={NODE_NAME_EXTRA: ["node-1"]},
    usages=["digital signature", "key encipherment", "client auth"], subject_cn="ciliary-node-node-1",
    subject_has_other_fields=False, san_count=0)


def test_the_agent_asking_for_its_own_node_is_approved() -> None:
    decision = decide(GOOD, agent_service_account=AGENT)
    assert decision.approve and decision.node == "node-1"


@pytest.mark.parametrize(("change", "reason"), [
    ({"signer_name": "kubernetes.io/kube-apiserver-client"}, "signer"),
    ({"username": "system:serviceaccount:default:nobody"}, "not the agent ServiceAccount"),
    ({"username": "system:node:node-1"}, "not the agent ServiceAccount"),
    ({"extra": {}}, "not bound to exactly one node"),
    ({"extra": {NODE_NAME_EXTRA: ["node-1", "node-2"]}}, "not bound to exactly one node"),
    ({"extra": {NODE_NAME_EXTRA: ["Node_1"]}}, "not a DNS subdomain"),
    ({"subject_cn": "ciliary-node-node-2"}, "is not 'ciliary-node-node-1'"),  # another node's user
    ({"subject_cn": "ciliary-operator"}, "is not 'ciliary-node-node-1'"),
    ({"subject_cn": "root"}, "is not 'ciliary-node-node-1'"),
    ({"subject_has_other_fields": True}, "more than its CN"),
    ({"san_count": 1}, "more than its CN"),
    ({"usages": ["server auth", "client auth"]}, "client auth only"),
    ({"usages": ["digital signature"]}, "client auth only"),
])
def test_everything_else_is_refused_with_its_reason(change: dict[str, object], reason: str) -> None:
    decision = decide(dataclasses.replace(GOOD, **change), agent_service_account=AGENT)  # type: ignore[arg-type]
    assert not decision.approve and reason in decision.reason and decision.node is None
