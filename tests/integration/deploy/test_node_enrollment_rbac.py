"""Every (resource, verb) the chart grants the etcd-enroller is needed: without any one of them, a real
enrollment (real enroller, real apiserver, real etcd) fails or the enroller's log shows the refusal.

The full grant is exercised in test_node_enrollment.py (no refusal, certificate issued); here each run
uses the chart's enroller rules minus one pair, with its own ServiceAccount, Node and Pod.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    NAMESPACE,
    Helm,
    documents,
    ensure_namespace,
    find,
    kubectl_ok,
    service_account_kubeconfig,
)
from test_node_enrollment import (
    AGENT_SA,
    ENROLLER_USES,
    EnrollerRun,
    api_access,
    pairs,
    pod,
    pod_token,
)

from ciliary.nodeagent import enroll

pytestmark = pytest.mark.integration
REFUSAL = re.compile(r"Forbidden|forbidden|\(403\)|status 403")


ENROLL_WAIT_S = 12


class Enrollment(threading.Thread):
    """The agent's enrollment (``enroll.enroll``) running beside the test: ``failed`` is its error, once done."""

    def __init__(self, api: Any, node: str, uid: str, directory: Path) -> None:
        super().__init__(name=f"enroll-{node}", daemon=True)
        self.api, self.node, self.uid, self.directory = api, node, uid, directory
        self.failed = ""
        self.start()

    def run(self) -> None:
        try:
            enroll.enroll(self.api, node=self.node, pod_uid=self.uid, directory=self.directory,
                          wait_seconds=ENROLL_WAIT_S, poll=0.3)
        except Exception as exc:  # noqa: BLE001 - the outcome the test reads; nothing escapes the thread
            self.failed = f"{type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return not self.is_alive()


def delete_csrs(kube: Any, node: str) -> None:
    names = kube.kubectl("get", "csr", "-o", "name").stdout.split()
    mine = [n for n in names if n.startswith(f"certificatesigningrequest.certificates.k8s.io/ciliary-etcd-{node}-")]
    if mine:
        kube.kubectl("delete", *mine, "--ignore-not-found", "--wait=false")


def without(rules: list[dict[str, Any]], removed: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The same grants minus one pair, one rule per remaining pair (resourceNames kept)."""
    names = {(g, r): rule.get("resourceNames") for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    out = []
    for g, r, v in sorted(pairs(rules) - {removed}):
        rule: dict[str, Any] = {"apiGroups": [g], "resources": [r], "verbs": [v]}
        if names[(g, r)]:
            rule["resourceNames"] = names[(g, r)]
        out.append(rule)
    return out


@pytest.fixture(scope="module")
def enroller_rules(helm: Helm, kube: Any) -> list[dict[str, Any]]:
    rendered = documents(helm.template())
    ensure_namespace(kube, NAMESPACE)
    agent = [d for d in rendered if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
             and d["metadata"]["name"].endswith("-agent")]
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": agent}))
    return list(find(rendered, "ClusterRole", "-etcd-enroller")["rules"])


@pytest.mark.parametrize("removed", sorted(ENROLLER_USES), ids=lambda p: f"{p[1]}-{p[2]}")
def test_each_granted_verb_is_needed(kube: Any, enroller_rules: list[dict[str, Any]], tmp_path: Path,
                                     removed: tuple[str, str, str]) -> None:
    rules = without(enroller_rules, removed)
    assert len(pairs(rules)) == len(ENROLLER_USES) - 1
    suffix = uuid.uuid4().hex[:6]
    account, node = f"enr-minus-{suffix}", f"enr-minus-{suffix}"
    items = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": account},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": account},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
    ]
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    run = EnrollerRun(kube, service_account_kubeconfig(kube, tmp_path / "kubeconfig", account=account,
                                                       namespace=NAMESPACE), tmp_path / "enroller.log")
    agent: Enrollment | None = None
    try:
        uid = pod(kube, f"{node}-agent", node, AGENT_SA)
        api = api_access(kube, pod_token(kube, AGENT_SA, f"{node}-agent"), tmp_path)
        # the agent's side waits for its certificate in a thread; a refusal in the enroller's log settles the
        # run as soon as it shows (the wait would only time out), else the agent's outcome and 5 s more do
        agent = Enrollment(api, node, uid, tmp_path / "out")
        deadline = time.monotonic() + ENROLL_WAIT_S + 5  # the sweep (nodes list) runs every second
        while not REFUSAL.search(run.text()) and not (agent.done() and agent.failed) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        failed = "refused (403) in the enroller's log" if REFUSAL.search(run.text()) else agent.failed
        assert failed, f"removing {removed} changed nothing: the verb is not needed\n{run.text()[-3000:]}"
    finally:
        # a request still waited for ends at once when its CSR is gone (the agent's read gets 404); again after
        # the thread ended, for a CSR it created after the first look
        delete_csrs(kube, node)
        if agent is not None:
            agent.join(ENROLL_WAIT_S + 5)
            delete_csrs(kube, node)
        run.stop()
        kube.kubectl("delete", "pod", f"{node}-agent", "-n", NAMESPACE, "--grace-period=0", "--force",
                     "--ignore-not-found", "--wait=false")
        kube.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false")
        kube.kubectl("delete", "clusterrolebinding,clusterrole", account, "--ignore-not-found", "--wait=false")
        kube.kubectl("delete", "serviceaccount", account, "-n", NAMESPACE, "--ignore-not-found", "--wait=false")
