"""The operator against the real apiserver and etcd: exactly the affected nodes' intents are rewritten.

Applying a CNP rewrites the intent keys of the nodes hosting the endpoints it
selects, and no other; deleting it restores their content; restarting the
operator changes no identity and rewrites no key. An invalid policy gets
``Valid=False`` with its message and an Event, and changes nothing.
"""

from __future__ import annotations

import json

import pytest
from op_harness import etcd_get_prefix, wait_for

from ciliary.operator.intents import parse_node_intent

pytestmark = pytest.mark.integration

NS = "cy-op-pub"
NODES = ("op-node-a", "op-node-b", "op-node-c")
PODS = {"web": ("op-node-a", "10.245.1.10", {"app": "web"}),
        "client": ("op-node-b", "10.245.2.10", {"app": "client"}),
        "other": ("op-node-c", "10.245.3.10", {"app": "other"})}

POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-from-client, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"""

INVALID = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: http-on-udp, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - toPorts: [{{ports: [{{port: "80", protocol: UDP}}], rules: {{http: [{{method: GET}}]}}}}]
"""


def intent_keys(kube) -> dict[str, tuple[int, bytes]]:
    rows = etcd_get_prefix(kube, "/ciliary/intents/v1/")
    return {k.rsplit("/", 1)[1]: v for k, v in rows.items() if k.rsplit("/", 1)[1] in NODES}


@pytest.fixture(scope="module")
def cluster(kube, crds):
    kube.kubectl("create", "namespace", NS)
    for i, node in enumerate(NODES, start=1):
        kube.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "spec": {"podCIDR": f"10.245.{i}.0/24"}}), check=True)
        kube.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.{i}"}]}}), check=True)
    for name, (node, ip, labels) in PODS.items():
        kube.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "lab",
                                                        "ports": [{"containerPort": 80, "name": "http"}]}]}}),
            check=True)
        kube.kubectl("patch", "pod", name, "-n", NS, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}), check=True)
    yield
    kube.kubectl("delete", "namespace", NS, "--wait=false")
    for node in NODES:
        kube.kubectl("delete", "node", node, "--wait=false")


def test_policy_rewrites_exactly_the_affected_nodes(kube, cluster, operator):
    wait_for(lambda: len(intent_keys(kube)) == 3 and all(
        any(e.pod in PODS for e in parse_node_intent(n, v).endpoints) for n, (_, v) in intent_keys(kube).items()),
        60, "intents of the three nodes with their pods", operator)
    before = intent_keys(kube)
    kube.kubectl("apply", "-f", "-", input=POLICY, check=True)

    def rewritten():
        now = intent_keys(kube)
        return now if now["op-node-a"][0] != before["op-node-a"][0] else None

    after = wait_for(rewritten, 30, "node-a's intent to be rewritten", operator)
    web = next(e for e in parse_node_intent("op-node-a", after["op-node-a"][1]).endpoints if e.pod == "web")
    assert web.ingress.enforced and any(r.name == "web-from-client" for x in web.ingress.entries for r in x.rules)
    assert after["op-node-b"][0] == before["op-node-b"][0], "node-b hosts no selected endpoint: not rewritten"
    assert after["op-node-c"][0] == before["op-node-c"][0], "node-c hosts no selected endpoint: not rewritten"
    cond = wait_for(lambda: _condition(kube, "web-from-client", "Valid"), 30, "Valid condition", operator)
    assert cond["status"] == "True"

    kube.kubectl("delete", "cnp", "web-from-client", "-n", NS, check=True)
    restored = wait_for(lambda: (now := intent_keys(kube))["op-node-a"][0] != after["op-node-a"][0] and now,
                        30, "node-a's intent to be restored", operator)
    assert parse_node_intent("op-node-a", restored["op-node-a"][1]).content_hash() == \
        parse_node_intent("op-node-a", before["op-node-a"][1]).content_hash()
    assert restored["op-node-b"][0] == before["op-node-b"][0]


def test_invalid_policy_is_refused_and_changes_nothing(kube, cluster, operator):
    wait_for(lambda: len(intent_keys(kube)) == 3, 60, "intents", operator)
    before = intent_keys(kube)
    kube.kubectl("apply", "-f", "-", input=INVALID, check=True)
    cond = wait_for(lambda: _condition(kube, "http-on-udp", "Valid"), 30, "Valid condition", operator)
    assert cond["status"] == "False"
    assert "TCP" in cond["message"] and "UDP" in cond["message"]
    def invalid_event():  # kopf posts events from a queue: it may land just after the status
        events = json.loads(kube.kubectl("get", "events", "-n", NS, "-o", "json", "--field-selector",
                                         "involvedObject.name=http-on-udp", check=True).stdout)["items"]
        return any(e["reason"] == "PolicyInvalid" for e in events)

    wait_for(invalid_event, 20, "a PolicyInvalid event", operator)
    # other suites share this control plane (their pods come and go, changing the ipcache), so compare
    # what the invalid policy could have changed: our endpoints' policy and the policies listed
    assert _our_enforcement(intent_keys(kube)) == _our_enforcement(before)
    kube.kubectl("delete", "cnp", "http-on-udp", "-n", NS, check=True)


def test_restart_changes_no_identity_and_rewrites_no_key(kube, cluster, operator):
    wait_for(lambda: len(intent_keys(kube)) == 3, 60, "intents", operator)
    kube.kubectl("apply", "-f", "-", input=POLICY, check=True)
    wait_for(lambda: _condition(kube, "web-from-client", "Valid"), 30, "policy accepted", operator)
    # other suites share this control plane: wait until their namespaces are gone (their pods change
    # the cluster-wide ipcache and identity labels every intent carries), then for a quiet etcd
    _drain_terminating_namespaces(kube)
    _wait_settled(kube)
    identities = etcd_get_prefix(kube, "/ciliary/identities/v1/")
    intents = intent_keys(kube)
    status_rv = kube.kubectl("get", "cnp", "web-from-client", "-n", NS, "-o",
                             "jsonpath={.metadata.resourceVersion}", check=True).stdout
    operator.stop()
    since = operator.log_size()
    operator.start()
    # positive signals first: the restarted operator listed, resolved and compared with etcd (its first
    # reconcile pass), and its status handover looked at every policy; only then "nothing changed" means it
    first = operator.wait_logged(r"reconcile pass 1 complete at revision \d+: (\d+) intents written", since=since)
    operator.wait_logged(r"Status handover caught up", since=since)
    assert first.group(1) == "0", first.group(0)
    assert _operator_alive(operator)
    assert etcd_get_prefix(kube, "/ciliary/identities/v1/") == identities
    assert intent_keys(kube) == intents
    assert kube.kubectl("get", "cnp", "web-from-client", "-n", NS, "-o",
                        "jsonpath={.metadata.resourceVersion}", check=True).stdout == status_rv
    kube.kubectl("delete", "cnp", "web-from-client", "-n", NS, check=True)


def _drain_terminating_namespaces(kube, seconds: float = 120.0) -> None:
    """Wait until no namespace is Terminating; pods bound to deleted nodes are force-deleted.

    Without a kubelet such pods would otherwise linger until the pod garbage collector removes
    them, at a moment this test cannot predict.
    """
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        spaces = json.loads(kube.kubectl("get", "namespaces", "-o", "json", check=True).stdout)["items"]
        draining = [n["metadata"]["name"] for n in spaces if n.get("status", {}).get("phase") == "Terminating"]
        if not draining:
            return
        for name in draining:
            kube.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", "--wait=false")
        time.sleep(1.0)
    pytest.fail(f"namespaces still terminating after {seconds:.0f} s: {draining}")


def _wait_settled(kube, quiet: float = 3.0, seconds: float = 90.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    last, since = intent_keys(kube), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = intent_keys(kube)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    pytest.fail("intent keys never settled")


def _our_enforcement(keys) -> dict:
    out = {}
    for node, (_, value) in keys.items():
        intent = parse_node_intent(node, value)
        out[node] = ([e.model_dump() for e in intent.endpoints if e.namespace == NS and e.pod in PODS],
                     sorted(p.name for p in intent.policies))
    return out


def _operator_alive(operator) -> bool:
    return operator.proc is not None and operator.proc.poll() is None and "Traceback" not in operator.text()


def _condition(kube, name: str, kind: str):
    out = kube.kubectl("get", "cnp", name, "-n", NS, "-o", "json")
    if out.returncode != 0:
        return None
    for cond in json.loads(out.stdout).get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return cond
    return None
