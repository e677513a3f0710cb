"""The operator's load-balancing shell against the real apiserver and etcd.

Selector-less Services with hand-written endpoints (so the test controls every endpoint): the
operator publishes each node's LB intent as shards under ``/ciliary/lbintents/v2/<node>/`` (read
back here as the agent does: complete, matching the manifest), reading v1
Endpoints with ``--endpoints-api endpoints`` and EndpointSlices by default; a NodePort outside the
operator's ``--node-port-range`` gets a Warning Event and no NodePort frontend, the other Services
are unaffected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from op_harness import OperatorProcess, etcd_get_prefix, wait_for

from ciliary.operator.services import sharding
from ciliary.operator.services.intent import FrontendKind, NodeLBIntent
from ciliary.operator.store import keyspace

pytestmark = pytest.mark.integration

NS = "cy-op-lb"
NODES = {"lb-node-a": "198.51.100.21", "lb-node-b": "198.51.100.22"}

OBJECTS = f"""
apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: {NS}}}
spec:
  type: NodePort
  ports: [{{name: http, port: 80, protocol: TCP, nodePort: 31005}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: legacy, namespace: {NS}}}
subsets:
- addresses: [{{ip: 10.246.1.5, nodeName: lb-node-a}}]
  notReadyAddresses: [{{ip: 10.246.1.6, nodeName: lb-node-b}}]
  ports: [{{name: http, port: 8080, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: sliced, namespace: {NS}}}
spec:
  ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sliced-1
  namespace: {NS}
  labels: {{kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]
endpoints:
- addresses: [10.246.2.7]
  nodeName: lb-node-b
  conditions: {{ready: false, serving: true, terminating: true}}
---
apiVersion: v1
kind: Service
metadata: {{name: outofrange, namespace: {NS}}}
spec:
  type: NodePort
  ports: [{{name: http, port: 80, protocol: TCP, nodePort: 30555}}]
"""


def lb_intents(kube) -> dict[str, NodeLBIntent]:
    rows = etcd_get_prefix(kube, keyspace.LB_INTENTS_PREFIX)
    values: dict[str, dict[str, bytes]] = {}
    for key, (_, value) in rows.items():
        node, part = keyspace.lb_intent_part_from_key(key)
        values.setdefault(node, {})[part] = value
    assembled = {node: sharding.assemble(node, values[node]) for node in NODES if node in values}
    return {node: intent for node, intent in assembled.items() if intent is not None}


def cluster_ip(kube, name: str) -> str:
    return str(json.loads(kube.kubectl("get", "svc", name, "-n", NS, "-o", "json", check=True).stdout)
               ["spec"]["clusterIP"])


@pytest.fixture(scope="module")
def objects(kube, crds) -> Iterator[None]:
    kube.kubectl("create", "namespace", NS)
    for node, ip in NODES.items():
        kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node",
                                                          "metadata": {"name": node}}), check=True)
        kube.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}), check=True)
    kube.kubectl("apply", "-f", "-", input=OBJECTS, check=True)
    yield
    kube.kubectl("delete", "namespace", NS, "--wait=false")
    for node in NODES:
        kube.kubectl("delete", "node", node, "--wait=false")


def run_operator(kube, tmp_path, *args: str) -> OperatorProcess:
    proc = OperatorProcess(kube, tmp_path / "operator.log", ("--node-port-range", "31000-31010", *args))
    proc.start()
    return proc


def frontends(intent: NodeLBIntent, service: str) -> dict[tuple[str, int, str], object]:
    return {fe.key: fe for fe in intent.frontends if fe.service == f"{NS}/{service}"}


def test_v1_endpoints_fallback_publishes_every_nodes_lb_intent(kube, objects, tmp_path) -> None:
    operator = run_operator(kube, tmp_path, "--endpoints-api", "endpoints")
    try:
        vip = cluster_ip(kube, "legacy")
        def ours() -> dict[str, NodeLBIntent] | None:
            i = lb_intents(kube)
            done = all((fe := frontends(i.get(n, NodeLBIntent(node=n)), "legacy").get((vip, 80, "TCP")))
                       is not None and fe.backends for n in NODES)  # type: ignore[attr-defined]
            return i if done else None

        got = wait_for(ours, 60, "LB intents from v1 Endpoints", operator)
        for node in NODES:
            fes = frontends(got[node], "legacy")
            # the NodePort on the node's own address only (another node's is that node's to serve)
            assert set(fes) == {(vip, 80, "TCP"), (NODES[node], 31005, "TCP")}
            cluster = fes[(vip, 80, "TCP")]
            assert [(b.address, b.port) for b in cluster.backends] == [("10.246.1.5", 8080)]  # not the unready one
            assert fes[(NODES[node], 31005, "TCP")].kind is FrontendKind.NODE_PORT
    finally:
        operator.stop()


def test_endpointslices_terminating_fallback_and_an_out_of_range_nodeport(kube, objects, tmp_path) -> None:
    operator = run_operator(kube, tmp_path)
    try:
        vip, bad_vip = cluster_ip(kube, "sliced"), cluster_ip(kube, "outofrange")
        # the previous test's operator (v1 Endpoints: "sliced" has none) left intents behind: wait for ours
        def ours() -> dict[str, NodeLBIntent] | None:
            i = lb_intents(kube)
            fe = frontends(i.get("lb-node-a", NodeLBIntent(node="x")), "sliced").get((vip, 53, "UDP"))
            return i if fe is not None and fe.backends else None  # type: ignore[attr-defined]

        got = wait_for(ours, 60, "LB intents from EndpointSlices", operator)
        fes = frontends(got["lb-node-a"], "sliced")
        udp, tcp = fes[(vip, 53, "UDP")], fes[(vip, 53, "TCP")]
        assert [(b.address, b.port, b.state.value) for b in udp.backends] == [("10.246.2.7", 5353, "terminating")]
        assert [(b.address, b.port) for b in tcp.backends] == [("10.246.2.7", 53)]
        bad = frontends(got["lb-node-a"], "outofrange")
        assert set(bad) == {(bad_vip, 80, "TCP")}  # the ClusterIP stays, the NodePort frontends do not
        assert any(p.service == f"{NS}/outofrange" and p.reason == "NodePortOutOfRange"
                   for p in got["lb-node-a"].problems)

        def warning() -> bool:
            events = json.loads(kube.kubectl("get", "events", "-n", NS, "-o", "json", "--field-selector",
                                             "involvedObject.name=outofrange", check=True).stdout)["items"]
            return any(e["reason"] == "NodePortOutOfRange" and e["type"] == "Warning" for e in events)

        wait_for(warning, 30, "a NodePortOutOfRange Warning Event", operator)
        # an endpoint update reaches the intent
        kube.kubectl("patch", "endpointslice", "sliced-1", "-n", NS, "--type=merge", "-p", json.dumps(
            {"endpoints": [{"addresses": ["10.246.2.8"], "conditions": {"ready": True}}]}), check=True)
        wait_for(lambda: [b.address for b in frontends(lb_intents(kube)["lb-node-b"], "sliced")[(vip, 53, "UDP")]
                          .backends] == ["10.246.2.8"], 30, "the updated slice in the intent", operator)
    finally:
        operator.stop()
