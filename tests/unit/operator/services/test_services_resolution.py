"""Services + EndpointSlices -> per-node load-balancing intents (``ciliary.operator.services``), case by case."""

from __future__ import annotations

from typing import Any

import pytest

from ciliary.operator.services import inputs
from ciliary.operator.services.intent import (
    BackendState,
    FrontendKind,
    LBIntentSchemaError,
    NodeLBIntent,
    parse_lb_intent,
)
from ciliary.operator.services.resolution import ResolverConfig, resolve

NODES = {"node-1": "192.0.2.11", "node-2": "192.0.2.12"}


def service(name: str = "web", **spec: Any) -> dict[str, Any]:
    labels = spec.pop("labels", {})
    status = spec.pop("status", {})
    body = {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                     **spec}, "status": status}
    return body


def ep(ip: str, node: str = "node-1", *, ready: bool = True, serving: bool | None = None,
       terminating: bool = False, pod: str = "") -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready, "terminating": terminating}
    if serving is not None:
        cond["serving"] = serving
    out: dict[str, Any] = {"addresses": [ip], "conditions": cond, "nodeName": node}
    if pod:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return out


def eslice(name: str, svc: str, endpoints: list[dict[str, Any]],
           ports: list[dict[str, Any]] | None = None, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc, **labels}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def run(services: list[dict[str, Any]], slices: list[dict[str, Any]], config: ResolverConfig | None = None,
        nodes: dict[str, str | None] = NODES) -> Any:
    svcs = {s.key: s for s in map(inputs.service_from_body, services)}
    sls = {f"{s.namespace}/{s.name}": s for b in slices if (s := inputs.slice_from_body(b)) is not None}
    return resolve(svcs, sls, nodes, config or ResolverConfig())


def frontends(result: Any, node: str = "node-1") -> dict[tuple[str, int, str], Any]:
    return {fe.key: fe for fe in result.intents[node].frontends}


def test_cluster_ip_gets_every_ready_endpoint_on_every_node() -> None:
    r = run([service()], [eslice("web-1", "web", [ep("10.244.1.5"), ep("10.244.2.5", "node-2")])])
    for node in NODES:
        fe = frontends(r, node)[("10.96.0.10", 80, "TCP")]
        assert fe.kind is FrontendKind.CLUSTER_IP
        assert [(b.address, b.port) for b in fe.backends] == [("10.244.1.5", 8080), ("10.244.2.5", 8080)]
    assert not r.problems


def test_same_port_on_tcp_and_udp_is_two_frontends() -> None:
    svc = service(ports=[{"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                         {"name": "dns-udp", "port": 53, "protocol": "UDP"}])
    sl = eslice("web-1", "web", [ep("10.244.1.5")], ports=[{"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                                                          {"name": "dns-udp", "port": 53, "protocol": "UDP"}])
    fes = frontends(run([svc], [sl]))
    assert fes[("10.96.0.10", 53, "TCP")].backends[0].port == 5353
    assert fes[("10.96.0.10", 53, "UDP")].backends[0].port == 53


def test_no_endpoints_is_a_frontend_with_no_backend_refused_not_dropped() -> None:
    fe = frontends(run([service()], []))[("10.96.0.10", 80, "TCP")]
    assert fe.backends == () and not fe.no_local_backends


def test_terminating_fallback_only_when_nothing_is_ready() -> None:
    slices = [eslice("web-1", "web", [ep("10.244.1.5", ready=False, serving=True, terminating=True),
                                      ep("10.244.1.6", ready=False, serving=False, terminating=True),
                                      ep("10.244.1.7", ready=False, serving=False)])]
    fe = frontends(run([service()], slices))[("10.96.0.10", 80, "TCP")]
    assert [(b.address, b.state) for b in fe.backends] == [("10.244.1.5", BackendState.TERMINATING)]
    slices[0]["endpoints"].append(ep("10.244.1.8"))
    fe = frontends(run([service()], slices))[("10.96.0.10", 80, "TCP")]
    assert [(b.address, b.state) for b in fe.backends] == [("10.244.1.8", BackendState.READY)]


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints_and_drops_without_them() -> None:
    svc = service(internalTrafficPolicy="Local")
    r = run([svc], [eslice("web-1", "web", [ep("10.244.1.5", "node-1")])])
    on1, on2 = frontends(r, "node-1")[("10.96.0.10", 80, "TCP")], frontends(r, "node-2")[("10.96.0.10", 80, "TCP")]
    assert [b.address for b in on1.backends] == ["10.244.1.5"] and not on1.no_local_backends
    assert on2.backends == () and on2.no_local_backends  # endpoints exist, none here: drop, not refuse


def test_local_fallback_to_terminating_is_per_node() -> None:
    svc = service(internalTrafficPolicy="Local")
    r = run([svc], [eslice("web-1", "web", [ep("10.244.1.5", "node-1"),
                                            ep("10.244.2.5", "node-2", ready=False, serving=True,
                                               terminating=True)])])
    on2 = frontends(r, "node-2")[("10.96.0.10", 80, "TCP")]
    assert [(b.address, b.state) for b in on2.backends] == [("10.244.2.5", BackendState.TERMINATING)]


def test_nodeport_on_each_nodes_own_address_external_and_load_balancer_ips() -> None:
    svc = service(type="LoadBalancer", externalIPs=["203.0.113.7"], externalTrafficPolicy="Local",
                  ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
                  status={"loadBalancer": {"ingress": [{"ip": "198.51.100.5"}]}})
    fes = frontends(run([svc], [eslice("web-1", "web", [ep("10.244.2.5", "node-2")])]))
    kinds = {k: fe.kind for k, fe in fes.items()}
    assert kinds == {("10.96.0.10", 80, "TCP"): FrontendKind.CLUSTER_IP,
                     ("192.0.2.11", 30080, "TCP"): FrontendKind.NODE_PORT,
                     ("203.0.113.7", 80, "TCP"): FrontendKind.EXTERNAL_IP,
                     ("198.51.100.5", 80, "TCP"): FrontendKind.LOAD_BALANCER}
    # node-2's NodePort is node-2's: a client on node-1 goes there untranslated (its externalTrafficPolicy)
    assert [fe.address for fe in frontends(run([svc], [eslice("web-1", "web", [ep("10.244.2.5", "node-2")])]),
                                           "node-2").values() if fe.kind is FrontendKind.NODE_PORT] == ["192.0.2.12"]
    # socket-level clients are on a node: external frontends use the cluster-wide set
    assert all(fe.backends[0].address == "10.244.2.5" for fe in fes.values())
    assert fes[("192.0.2.11", 30080, "TCP")].traffic_policy == "Local"


def test_load_balancer_source_ranges_restrict_only_the_load_balancer_frontends() -> None:
    """kube-proxy applies loadBalancerSourceRanges to the load balancer IPs only; the field wins over the
    legacy annotation, which counts without it; ranges are normalised."""
    def lb(**extra: Any) -> dict[str, Any]:
        return service(type="LoadBalancer", externalIPs=["203.0.113.7"],
                       ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
                       status={"loadBalancer": {"ingress": [{"ip": "198.51.100.5"}]}}, **extra)

    fes = frontends(run([lb(loadBalancerSourceRanges=["192.0.2.7/24", "2001:db8::/32"])], []))
    assert fes[("198.51.100.5", 80, "TCP")].source_ranges == ("192.0.2.0/24", "2001:db8::/32")
    assert all(not fe.source_ranges for key, fe in fes.items() if key[0] != "198.51.100.5")
    body = lb()
    body["metadata"]["annotations"] = {inputs.SOURCE_RANGES_ANNOTATION: "10.0.0.0/8, 172.16.0.0/12"}
    assert frontends(run([body], []))[("198.51.100.5", 80, "TCP")].source_ranges == ("10.0.0.0/8",
                                                                                     "172.16.0.0/12")
    both = lb(loadBalancerSourceRanges=["192.0.2.0/24"])
    both["metadata"]["annotations"] = {inputs.SOURCE_RANGES_ANNOTATION: "10.0.0.0/8"}
    assert frontends(run([both], []))[("198.51.100.5", 80, "TCP")].source_ranges == ("192.0.2.0/24",)
    plain = service(type="NodePort", loadBalancerSourceRanges=["192.0.2.0/24"])
    assert all(not fe.source_ranges for fe in frontends(run([plain], [])).values())


def test_session_affinity_client_ip_with_default_and_explicit_timeout() -> None:
    fe = frontends(run([service(sessionAffinity="ClientIP")], []))[("10.96.0.10", 80, "TCP")]
    assert fe.affinity_timeout == 10800
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})
    assert frontends(run([svc], []))[("10.96.0.10", 80, "TCP")].affinity_timeout == 5
    assert frontends(run([service()], []))[("10.96.0.10", 80, "TCP")].affinity_timeout == 0


@pytest.mark.parametrize("svc", [
    service(labels={"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    service(clusterIP="None"),
    service(labels={"service.kubernetes.io/headless": ""}),
    service(type="ExternalName", externalName="example.com", clusterIP=""),
], ids=["service-proxy-name", "headless", "labelled-headless", "external-name"])
def test_opted_out_services_get_no_frontend(svc: dict[str, Any]) -> None:
    assert frontends(run([svc], [eslice("web-1", "web", [ep("10.244.1.5")])])) == {}


def test_service_proxy_name_equal_to_ours_is_served() -> None:
    svc = service(labels={"service.kubernetes.io/service-proxy-name": "ciliary"})
    assert frontends(run([svc], [], ResolverConfig(proxy_name="ciliary")))


def test_slices_labelled_headless_are_ignored() -> None:
    r = run([service()], [eslice("web-1", "web", [ep("10.244.1.5")],
                                 **{"service.kubernetes.io/headless": ""})])
    assert frontends(r)[("10.96.0.10", 80, "TCP")].backends == ()


def test_named_target_port_resolves_per_pod_and_a_pod_without_it_is_a_problem() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "targetPort": "web"}])
    slices = [eslice("web-1", "web", [ep("10.244.1.5", pod="a")], ports=[{"name": "http", "port": 8080}]),
              eslice("web-2", "web", [ep("10.244.1.6", pod="b")], ports=[{"name": "http", "port": 9090}]),
              eslice("web-3", "web", [ep("10.244.1.7", pod="c")], ports=[])]
    r = run([svc], slices)
    fe = frontends(r)[("10.96.0.10", 80, "TCP")]
    assert [(b.address, b.port) for b in fe.backends] == [("10.244.1.5", 8080), ("10.244.1.6", 9090)]
    (problem,) = r.problems["default/web"]
    assert problem.reason == "TargetPortUnresolved" and "default/c" in problem.message
    assert [p.reason for p in r.intents["node-2"].problems] == ["TargetPortUnresolved"]


def test_nodeport_outside_the_range_is_refused_but_clusterip_and_other_services_stay() -> None:
    bad = service("bad", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    good = service("good", clusterIP="10.96.0.11", type="NodePort",
                   ports=[{"name": "http", "port": 80, "nodePort": 31000}])
    r = run([bad, good], [], ResolverConfig(node_port_range=(31000, 31999)))
    fes = frontends(r)
    assert ("192.0.2.11", 30080, "TCP") not in fes and ("10.96.0.10", 80, "TCP") in fes
    assert ("192.0.2.11", 31000, "TCP") in fes
    assert [p.reason for p in r.problems["default/bad"]] == ["NodePortOutOfRange"]
    assert "default/good" not in r.problems


def test_more_backends_than_slots_refuses_the_port_never_a_subset() -> None:
    many = [ep(f"10.244.1.{i}") for i in range(1, 6)]
    other = service("other", clusterIP="10.96.0.11")
    r = run([service(), other], [eslice("web-1", "web", many), eslice("other-1", "other", many[:2])],
            ResolverConfig(max_backends=4))
    fes = frontends(r)
    assert ("10.96.0.10", 80, "TCP") not in fes
    assert len(fes[("10.96.0.11", 80, "TCP")].backends) == 2
    assert [p.reason for p in r.problems["default/web"]] == ["TooManyBackends"]


def test_two_services_claiming_one_external_ip_first_keeps_it() -> None:
    a = service("a", externalIPs=["203.0.113.7"])
    b = service("b", clusterIP="10.96.0.11", externalIPs=["203.0.113.7"])
    r = run([b, a], [])
    assert frontends(r)[("203.0.113.7", 80, "TCP")].service == "default/a"
    assert [p.reason for p in r.problems["default/b"]] == ["FrontendConflict"]


def test_a_nodeport_conflict_is_listed_once_per_node_address() -> None:
    """Each node's intent has only its own NodePort: a conflict on node-2's is listed too, and once."""
    port = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
    a = service("a", type="NodePort", ports=port)
    b = service("b", clusterIP="10.96.0.11", type="NodePort", ports=port)
    r = run([b, a], [])
    listed = sorted(p.message for p in r.problems["default/b"] if p.reason == "FrontendConflict")
    assert len(listed) == 2 and "192.0.2.11:30080/TCP" in listed[0] and "192.0.2.12:30080/TCP" in listed[1]


def test_v1_endpoints_fallback_reads_subsets() -> None:
    body = {"metadata": {"name": "web", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "10.244.1.5", "nodeName": "node-1"}],
                         "notReadyAddresses": [{"ip": "10.244.1.6"}],
                         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]}
    slices = {f"default/{s.name}": s for s in inputs.slices_from_endpoints(body)}
    svc = inputs.service_from_body(service())
    r = resolve({svc.key: svc}, slices, NODES)
    fe = frontends(r)[("10.96.0.10", 80, "TCP")]
    assert [b.address for b in fe.backends] == ["10.244.1.5"]


def test_ipv6_slices_and_addresses_are_ignored() -> None:
    sl = eslice("web-1", "web", [ep("fd00::1")])
    sl["addressType"] = "IPv6"
    assert inputs.slice_from_body(sl) is None


def test_wire_round_trip_and_schema_refusal() -> None:
    r = run([service()], [eslice("web-1", "web", [ep("10.244.1.5")])])
    intent = r.intents["node-1"]
    assert parse_lb_intent("node-1", intent.to_wire()) == intent
    with pytest.raises(LBIntentSchemaError):
        parse_lb_intent("node-1", b'{"schema_version": 99, "node": "node-1"}')
    with pytest.raises(LBIntentSchemaError):
        parse_lb_intent("node-1", b"not json")
    assert NodeLBIntent(node="x").content_hash() == NodeLBIntent(node="x").content_hash()


def test_health_check_node_port_counts_ready_endpoints_per_node() -> None:
    svc = service(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                  ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                         {"name": "alt", "port": 81, "targetPort": 8081, "nodePort": 30081}])
    result = run([svc], [eslice("web-a", "web", [ep("10.0.1.5"), ep("10.0.1.6"), ep("10.0.1.7", ready=False),
                                                   ep("10.0.2.5", "node-2", ready=False, serving=True,
                                                      terminating=True)],
                                ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                       {"name": "alt", "port": 8081, "protocol": "TCP"}])])
    checks = {node: [(h.service, h.port, h.local_endpoints) for h in intent.health_checks]
              for node, intent in result.intents.items()}
    # two ready endpoints on node-1 (counted once across both ports); node-2's only endpoint is terminating
    assert checks == {"node-1": [("default/web", 32000, 2)], "node-2": [("default/web", 32000, 0)]}


@pytest.mark.parametrize("spec", [{"type": "LoadBalancer", "healthCheckNodePort": 32000},
                                  {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
                                  {"type": "ClusterIP", "clusterIP": "None", "externalTrafficPolicy": "Local",
                                   "healthCheckNodePort": 32000}])
def test_no_health_check_without_local_policy_a_port_or_a_served_service(spec: dict[str, Any]) -> None:
    result = run([service(**spec)], [eslice("web-a", "web", [ep("10.0.1.5")])])
    assert all(intent.health_checks == () for intent in result.intents.values())


def test_health_checks_survive_the_wire() -> None:
    svc = service(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000)
    intent = run([svc], [eslice("web-a", "web", [ep("10.0.1.5")])]).intents["node-1"]
    assert parse_lb_intent("node-1", intent.to_wire()) == intent
    assert intent.health_checks[0].local_endpoints == 1


def test_forwarding_mode_from_lb_mode_and_the_annotation_external_frontends_only() -> None:
    """``--lb-mode`` sets the default; ``service.cilium.io/forwarding-mode`` (dsr or snat, any case) chooses for
    its Service; another value is a problem on that Service alone, which keeps the default; a ClusterIP is
    never DSR (its clients are on the nodes: socket load balancing)."""
    def lb(name: str, mode: str | None) -> dict[str, Any]:
        body = service(name, clusterIP=f"10.96.0.{20 + len(name)}", type="LoadBalancer",
                       externalIPs=[f"203.0.113.{len(name)}"],
                       ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30000 + len(name)}],
                       status={"loadBalancer": {"ingress": [{"ip": f"198.51.100.{len(name)}"}]}})
        if mode is not None:
            body["metadata"]["annotations"] = {inputs.FORWARDING_MODE_ANNOTATION: mode}
        return body

    bodies = [lb("a", None), lb("bb", "dsr"), lb("ccc", "SNAT"), lb("dddd", "direct")]

    def modes(config: ResolverConfig) -> tuple[dict[str, set[bool]], Any]:
        r = run(bodies, [], config)
        out: dict[str, set[bool]] = {}
        for fe in frontends(r).values():
            if fe.kind is FrontendKind.CLUSTER_IP:
                assert fe.dsr is False
            else:
                out.setdefault(fe.service, set()).add(fe.dsr)
        return out, r

    snat, r = modes(ResolverConfig())
    assert snat == {"default/a": {False}, "default/bb": {True}, "default/ccc": {False}, "default/dddd": {False}}
    assert [p.reason for p in r.problems["default/dddd"]] == ["ForwardingModeInvalid"]
    assert "'direct'" in r.problems["default/dddd"][0].message and "(snat)" in r.problems["default/dddd"][0].message
    assert set(r.problems) == {"default/dddd"}
    dsr, r = modes(ResolverConfig(lb_mode="dsr"))
    assert dsr == {"default/a": {True}, "default/bb": {True}, "default/ccc": {False}, "default/dddd": {True}}
    assert "(dsr)" in r.problems["default/dddd"][0].message


def test_sctp_from_outside_is_reported_not_served_and_pods_keep_their_frontends() -> None:
    """The north-south programs pass SCTP untouched: an SCTP NodePort / ExternalIP gets a Warning saying so (its
    frontends stay for pods and the nodes' own processes); TCP beside it, and an SCTP ClusterIP, get none."""
    sctp = service("sctp", type="NodePort", externalIPs=["203.0.113.10"], ports=[
        {"name": "assoc", "port": 9000, "protocol": "SCTP", "nodePort": 30900},
        {"name": "http", "port": 80, "nodePort": 30080}])
    inside = service("inside", clusterIP="10.96.0.11", ports=[{"name": "assoc", "port": 9000, "protocol": "SCTP"}])
    r = run([sctp, inside], [])
    fes = frontends(r)
    assert {("192.0.2.11", 30900, "SCTP"), ("203.0.113.10", 9000, "SCTP"), ("10.96.0.10", 9000, "SCTP"),
            ("10.96.0.11", 9000, "SCTP")} <= set(fes)
    (problem,) = r.problems["default/sctp"]
    assert problem.reason == "SCTPFromOutsideNotServed"
    assert "port assoc" in problem.message and "ExternalIP, NodePort" in problem.message
    assert "default/inside" not in r.problems
