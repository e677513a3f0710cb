"""The service map's pure core (ciliary.operator.service_map): Hubble flows -> nodes, edges, layout.
The flows are the ones Ciliary's agents emit for the Star Wars scene (deathstar and xwing on node-1, tiefighter on node-2, rule1 allowing org=empire on 80/TCP)."""

from __future__ import annotations

from ciliary.hubbleapi import flow_pb2, observer_pb2, relay_pb2
from ciliary.operator import service_map

NS_LABEL = "k8s:io.kubernetes.pod.namespace=default"
CLUSTER = "k8s:io.cilium.k8s.policy.cluster=default"
PODS = {  # name: (ip, identity, labels)
    "deathstar": ("10.244.1.10", 300, ["k8s:class=deathstar", "k8s:org=empire", NS_LABEL, CLUSTER]),
    "xwing": ("10.244.1.11", 301, ["k8s:class=xwing", "k8s:org=alliance", NS_LABEL, CLUSTER]),
    "tiefighter": ("10.244.2.10", 302, ["k8s:class=tiefighter", "k8s:org=empire", NS_LABEL, CLUSTER]),
}
NODE_OF = {"deathstar": "node-1", "xwing": "node-1", "tiefighter": "node-2"}


def endpoint(name: str, observer: str) -> flow_pb2.Endpoint:
    """The endpoint as the agent on ``observer`` describes it: pod names only for its own pods."""
    _, identity, labels = PODS[name]
    return flow_pb2.Endpoint(identity=identity, namespace="default", labels=labels,
                             pod_name=name if NODE_OF[name] == observer else "")


def flow(src: str, dst: str, *, at: str, verdict: int = flow_pb2.FORWARDED, reply: bool = False,
         dport: int = 80, second: int = 1, policy: str = "") -> flow_pb2.Flow:
    """One flow seen at ``at`` ("egress" at the source's node, "ingress" at the destination's)."""
    observer = NODE_OF[src] if at == "egress" else NODE_OF[dst]
    out = flow_pb2.Flow(node_name=observer, verdict=verdict, source=endpoint(src, observer),
                        destination=endpoint(dst, observer),
                        traffic_direction=flow_pb2.EGRESS if at == "egress" else flow_pb2.INGRESS)
    out.time.seconds = 1700000000 + second
    out.is_reply.value = reply
    out.IP.source, out.IP.destination = PODS[src][0], PODS[dst][0]
    out.l4.TCP.source_port, out.l4.TCP.destination_port = (80, 40000) if reply else (40000, dport)
    out.Summary = "TCP Flags: SYN"
    if verdict == flow_pb2.DROPPED:
        out.drop_reason_desc = flow_pb2.POLICY_DENIED
    if policy:
        out.ingress_allowed_by.append(flow_pb2.Policy(name=policy, namespace="default"))
    return out


def star_wars() -> list[observer_pb2.GetFlowsResponse]:
    flows = [
        flow("tiefighter", "deathstar", at="egress", second=1),
        flow("tiefighter", "deathstar", at="ingress", second=1, policy="rule1"),
        flow("deathstar", "tiefighter", at="egress", reply=True, second=2),
        flow("xwing", "deathstar", at="egress", second=3),
        flow("xwing", "deathstar", at="ingress", verdict=flow_pb2.DROPPED, second=3),
        flow("xwing", "deathstar", at="ingress", verdict=flow_pb2.DROPPED, second=4),
    ]
    return [observer_pb2.GetFlowsResponse(flow=f, node_name=f.node_name, time=f.time) for f in flows]


def by_name(graph: dict) -> tuple[dict, dict]:
    nodes = {n["name"]: n for n in graph["nodes"]}
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    edges = {(names[e["source"]], names[e["target"]], e["protocol"], e["port"]): e for e in graph["edges"]}
    return nodes, edges


def test_star_wars_scene_gives_three_workloads_one_forwarded_and_one_dropped_edge() -> None:
    graph = service_map.build(star_wars())
    nodes, edges = by_name(graph)
    assert sorted(nodes) == ["deathstar", "tiefighter", "xwing"]
    assert all(n["namespace"] == "default" and n["kind"] == "pod" for n in nodes.values())
    # node-1 knew tiefighter only by labels; its node-2 egress flow named it: one node, pod name known
    assert nodes["tiefighter"]["pods"] == ["tiefighter"] and nodes["tiefighter"]["identity"] == 302
    assert "k8s:class=tiefighter" in nodes["tiefighter"]["labels"] and NS_LABEL not in nodes["tiefighter"]["labels"]
    assert set(edges) == {("tiefighter", "deathstar", "TCP", 80), ("xwing", "deathstar", "TCP", 80)}
    green = edges["tiefighter", "deathstar", "TCP", 80]
    assert (green["state"], green["forwarded"], green["dropped"], green["policies"]) == ("forwarded", 2, 0,
                                                                                       ["default/rule1"])
    red = edges["xwing", "deathstar", "TCP", 80]  # forwarded at xwing's egress, dropped at deathstar's ingress
    assert (red["state"], red["forwarded"], red["dropped"]) == ("dropped", 1, 2)
    assert red["drop_reasons"] == {"POLICY_DENIED": 2}
    assert graph["replies_omitted"] == 1 and graph["flows_read"] == 6 and graph["namespaces"] == ["default"]
    # sources left, the deathstar one column to the right
    assert nodes["tiefighter"]["x"] == nodes["xwing"]["x"] < nodes["deathstar"]["x"]
    assert nodes["tiefighter"]["y"] != nodes["xwing"]["y"]
    recent = graph["recent_flows"]
    assert len(recent) == 5 and recent[0]["verdict"] == "DROPPED" and recent[0]["drop_reason"] == "POLICY_DENIED"
    assert recent[0]["source"] == "default/xwing" and recent[0]["destination"] == "default/deathstar"
    assert recent[-1]["source"] == "default/tiefighter" and recent[-1]["destination"].startswith("default/deathstar (")


def test_edge_state_is_the_verdict_at_the_last_observation_point() -> None:
    allowed_later = service_map.build(star_wars() + [observer_pb2.GetFlowsResponse(
        flow=flow("xwing", "deathstar", at="ingress", second=9))])
    assert by_name(allowed_later)[1]["xwing", "deathstar", "TCP", 80]["state"] == "mixed"
    egress_only = service_map.ServiceMap()
    world = flow_pb2.Endpoint(identity=2, labels=["reserved:world"])
    for verdict in (flow_pb2.DROPPED, flow_pb2.DROPPED):
        f = flow("xwing", "deathstar", at="egress", verdict=verdict, dport=443)
        f.destination.CopyFrom(world)
        egress_only.add_flow(f)
    _, edges = by_name(egress_only.graph())
    assert edges["xwing", "world", "TCP", 443]["state"] == "dropped"
    f = flow("xwing", "deathstar", at="egress", dport=443)
    f.destination.CopyFrom(world)
    egress_only.add_flow(f)
    nodes, edges = by_name(egress_only.graph())
    assert edges["xwing", "world", "TCP", 443]["state"] == "mixed"
    assert nodes["world"]["kind"] == "reserved" and nodes["world"]["namespace"] == ""


def test_ports_and_protocols_make_separate_edges() -> None:
    m = service_map.ServiceMap()
    m.add_flow(flow("tiefighter", "deathstar", at="ingress", dport=80))
    m.add_flow(flow("tiefighter", "deathstar", at="ingress", dport=8080))
    udp = flow("tiefighter", "deathstar", at="ingress")
    udp.l4.UDP.destination_port = 53  # replaces the TCP oneof member
    m.add_flow(udp)
    icmp = flow("tiefighter", "deathstar", at="ingress")
    icmp.l4.ICMPv4.type = 8
    m.add_flow(icmp)
    # node-1 saw tiefighter (a node-2 pod) by its labels only: it is named by them
    tiefighter = "class=tiefighter, org=empire"
    assert sorted(by_name(m.graph())[1]) == [(tiefighter, "deathstar", "ICMPv4", 0),
                                             (tiefighter, "deathstar", "TCP", 80),
                                             (tiefighter, "deathstar", "TCP", 8080),
                                             (tiefighter, "deathstar", "UDP", 53)]


def test_node_names_prefer_workload_then_app_label_then_the_one_pod() -> None:
    m = service_map.ServiceMap()
    labels = ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]
    for pod in ("web-1", "web-2"):
        m.add_flow(flow_pb2.Flow(source=flow_pb2.Endpoint(namespace="shop", pod_name=pod, identity=400, labels=labels),
                                 destination=flow_pb2.Endpoint(identity=1, labels=["reserved:host"])))
    m.add_flow(flow_pb2.Flow(source=flow_pb2.Endpoint(namespace="shop", pod_name="db-0", identity=401,
                                                      labels=["k8s:role=db"],
                                                      workloads=[flow_pb2.Workload(name="db", kind="StatefulSet")]),
                             destination=flow_pb2.Endpoint(identity=402, namespace="shop", labels=["k8s:x=1"])))
    for pod in ("a", "b"):
        m.add_flow(flow_pb2.Flow(source=flow_pb2.Endpoint(namespace="shop", pod_name=pod, identity=402,
                                                          labels=["k8s:x=1"]),
                                 destination=flow_pb2.Endpoint(identity=1, labels=["reserved:host"])))
    m.add_flow(flow_pb2.Flow(source=flow_pb2.Endpoint(), destination=flow_pb2.Endpoint(identity=16777217,
                             labels=["cidr:192.0.2.0/24=", "reserved:world"]),
                             IP=flow_pb2.IP(source="10.9.9.9", destination="192.0.2.100")))
    nodes = {n["name"]: n for n in m.graph()["nodes"]}
    assert nodes["web"]["pods"] == ["web-1", "web-2"] and nodes["web"]["namespace"] == "shop"
    assert nodes["db"]["pods"] == ["db-0"]
    assert nodes["x=1"]["pods"] == ["a", "b"]  # two pods, no app label: named by their labels
    assert nodes["host"]["kind"] == "reserved"
    assert nodes["192.0.2.0/24"]["kind"] == "cidr" and nodes["10.9.9.9"]["kind"] == "unknown"
    assert sorted(m.graph()["namespaces"]) == ["shop"]


def test_lost_events_and_unavailable_nodes_are_reported() -> None:
    responses = [observer_pb2.GetFlowsResponse(lost_events=flow_pb2.LostEvent(num_events_lost=7)),
                 observer_pb2.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
                     state_change=relay_pb2.NODE_UNAVAILABLE, node_names=["node-3"])), *star_wars()]
    graph = service_map.build(responses)
    assert graph["lost_events"] == 7 and graph["unavailable_nodes"] == ["node-3"] and graph["flows_read"] == 6


def test_recent_flows_are_bounded_newest_first() -> None:
    m = service_map.ServiceMap()
    for second in range(500):
        m.add_flow(flow("xwing", "deathstar", at="egress", second=second))
    recent = m.graph()["recent_flows"]
    assert len(recent) == service_map.RECENT_FLOWS == len(m.recent)
    assert recent[0]["time"] > recent[-1]["time"]
    assert by_name(m.graph())[1]["xwing", "deathstar", "TCP", 80]["forwarded"] == 500


def test_layout_terminates_on_cycles_and_self_loops() -> None:
    m = service_map.ServiceMap()
    m.add_flow(flow("xwing", "deathstar", at="egress"))
    m.add_flow(flow("deathstar", "xwing", at="egress"))
    m.add_flow(flow("xwing", "xwing", at="egress"))
    m.add_flow(flow("tiefighter", "xwing", at="egress"))
    nodes = {n["name"]: n for n in m.graph()["nodes"]}
    assert nodes["tiefighter"]["x"] < nodes["xwing"]["x"]
    positions = {(n["x"], n["y"]) for n in nodes.values()}
    assert len(positions) == 3  # no two nodes on one spot


def test_an_edge_names_the_services_its_connections_went_through() -> None:
    """The client's node names the Service (destination_service), the backend's does not: the edge has it once;
    an edge of connections straight to the pod has none."""
    through = flow("tiefighter", "deathstar", at="egress", second=1)
    through.destination_service.CopyFrom(flow_pb2.Service(name="deathstar-svc", namespace="default"))
    responses = [observer_pb2.GetFlowsResponse(flow=f, node_name=f.node_name, time=f.time)
                 for f in (through, flow("tiefighter", "deathstar", at="ingress", second=1, policy="rule1"),
                           flow("xwing", "deathstar", at="egress", second=3))]
    _, edges = by_name(service_map.build(responses))
    assert edges["tiefighter", "deathstar", "TCP", 80]["services"] == ["default/deathstar-svc"]
    assert edges["xwing", "deathstar", "TCP", 80]["services"] == []
