"""Property tests of load-balancing resolution against a plain reading of kube-proxy's rules.

Random Services (types, ports on TCP/UDP/SCTP, traffic policies, one bad NodePort now and then) and
random slices (endpoint conditions, nodes) go through ``resolve``; each frontend is checked against a
reference computed directly from the inputs.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.services.inputs import ServiceInfo, ServicePort, SliceEndpoint, SliceInfo, SlicePort
from ciliary.operator.services.intent import BackendState, FrontendKind
from ciliary.operator.services.resolution import ResolverConfig, resolve

NODES = {"n1": "192.0.2.11", "n2": "192.0.2.12", "n3": "192.0.2.13"}
CONFIG = ResolverConfig(node_port_range=(30000, 30999), max_backends=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

endpoints = st.builds(
    lambda host, node, ready, serving, terminating: SliceEndpoint(
        (f"10.244.{host // 10}.{host}",), ready, serving or ready, terminating, node, f"default/p{host}"),
    st.integers(1, 40), st.sampled_from(sorted(NODES)), st.booleans(), st.booleans(), st.booleans())


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, ServiceInfo], dict[str, SliceInfo]]:
    services: dict[str, ServiceInfo] = {}
    slices: dict[str, SliceInfo] = {}
    for i in range(draw(st.integers(1, 4))):
        protos = draw(st.lists(st.sampled_from(["TCP", "UDP", "SCTP"]), min_size=1, max_size=3, unique=True))
        kind = draw(st.sampled_from(["ClusterIP", "NodePort"]))
        ports = tuple(ServicePort(f"p-{p.lower()}", p, 80, 8080,
                                  draw(st.sampled_from([30000 + i, 31500])) if kind == "NodePort" else None)
                      for p in protos)
        svc = ServiceInfo("default", f"s{i}", type=kind, cluster_ips=(f"10.96.0.{i + 1}",), ports=ports,
                          internal_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])))
        services[svc.key] = svc
        for j in range(draw(st.integers(0, 2))):
            eps = tuple(draw(st.lists(endpoints, max_size=5, unique_by=lambda e: e.addresses)))
            sl = SliceInfo("default", f"s{i}-{j}", f"s{i}", tuple(SlicePort(p.name, p.protocol, 8080) for p in ports),
                           eps)
            slices[f"default/{sl.name}"] = sl
    return services, slices


def reference_backends(eps: list[SliceEndpoint]) -> tuple[set[str], BackendState]:
    ready = {e.addresses[0] for e in eps if e.ready}
    if ready:
        return ready, BackendState.READY
    return {e.addresses[0] for e in eps if e.serving and e.terminating}, BackendState.TERMINATING


@SETTINGS
@given(clusters())
def test_every_frontend_matches_the_reference(cluster: tuple[dict[str, ServiceInfo], dict[str, SliceInfo]]) -> None:
    services, slices = cluster
    result = resolve(services, slices, NODES, CONFIG)
    for node, intent in result.intents.items():
        keys = [fe.key for fe in intent.frontends]
        assert len(keys) == len(set(keys))  # (address, port, protocol) is unique: TCP and UDP never collide
        for fe in intent.frontends:
            svc = services[fe.service]
            first: dict[tuple[str, ...], SliceEndpoint] = {}  # an address in two slices: the first counts
            for name in sorted(slices):
                if slices[name].service_key == svc.key:
                    for e in slices[name].endpoints:
                        first.setdefault(e.addresses, e)
            eps = list(first.values())
            if fe.kind is FrontendKind.CLUSTER_IP and svc.internal_traffic_policy == "Local":
                want, state = reference_backends([e for e in eps if e.node == node])
                assert fe.no_local_backends == (not want and bool(reference_backends(eps)[0]))
            else:
                want, state = reference_backends(eps)
                assert not fe.no_local_backends
            assert {b.address for b in fe.backends} == want
            assert all(b.state is state for b in fe.backends)
            assert all(b.port == 8080 for b in fe.backends)
            if fe.kind is FrontendKind.NODE_PORT:
                assert 30000 <= fe.port <= 30999 and fe.address == NODES[node]  # its own address only


@SETTINGS
@given(clusters())
def test_problems_only_remove_what_they_concern(cluster: tuple[dict[str, ServiceInfo], dict[str, SliceInfo]]) -> None:
    services, slices = cluster
    result = resolve(services, slices, NODES, CONFIG)
    for key, svc in services.items():
        reasons = {p.reason for p in result.problems.get(key, ())}
        fes = [fe for fe in result.intents["n1"].frontends if fe.service == key]
        bad_nodeport = any(p.node_port == 31500 for p in svc.ports)
        assert ("NodePortOutOfRange" in reasons) == bad_nodeport
        too_many = "TooManyBackends" in reasons
        for port in svc.ports:
            mine = [fe for fe in fes if fe.protocol == port.protocol]
            if too_many and not mine:
                continue
            assert any(fe.kind is FrontendKind.CLUSTER_IP for fe in mine)
            assert any(fe.kind is FrontendKind.NODE_PORT for fe in mine) == (
                port.node_port is not None and port.node_port != 31500)
        # another Service's problems never change this Service's frontends
        alone = resolve({key: svc}, {k: s for k, s in slices.items() if s.service_key == key}, NODES, CONFIG)
        assert [fe for fe in alone.intents["n1"].frontends] == fes


@SETTINGS
@given(clusters(), st.randoms(use_true_random=False))
def test_input_order_does_not_matter(cluster: tuple[dict[str, ServiceInfo], dict[str, SliceInfo]],
                                     rnd: random.Random) -> None:
    services, slices = cluster
    first = resolve(services, slices, NODES, CONFIG)
    items = list(slices.items())
    rnd.shuffle(items)
    second = resolve(dict(reversed(list(services.items()))), dict(items), dict(reversed(list(NODES.items()))),
                     CONFIG)
    assert {n: i.to_wire() for n, i in first.intents.items()} == {n: i.to_wire() for n, i in second.intents.items()}
