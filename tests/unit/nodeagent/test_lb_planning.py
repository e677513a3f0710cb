"""The socket load balancer's planner (``lb_planning``): map contents, id stability, write order."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import lb_planning
from ciliary.nodeagent.lb_planning import LBCapacityError, LBState, ServiceKey, plan
from ciliary.nodeagent.planning import MapDiff
from ciliary.operator.services.intent import BackendIntent, FrontendIntent, FrontendKind, NodeLBIntent

SIZES = {"services_size": 1000, "backends_size": 1000}


def fe(address: str, port: int, protocol: str, backends: list[tuple[str, int]], **kw: object) -> FrontendIntent:
    return FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address=address, port=port,
                          protocol=protocol, backends=tuple(BackendIntent(address=a, port=p) for a, p in backends),
                          **kw)  # type: ignore[arg-type]


def applied(observed: LBState, step: lb_planning.LBPlan) -> LBState:
    services = dict(observed.services)
    backends = dict(observed.backends)
    backends.update(step.backend_upserts.upserts)
    services.update(step.service_writes.upserts)
    for k in step.service_writes.deletes:
        del services[k]
    for b in step.backend_deletes.deletes:
        del backends[b]
    nodeports = {**observed.nodeports, **step.nodeport_writes.upserts}
    for n in step.nodeport_writes.deletes:
        del nodeports[n]
    ranges = {**observed.source_ranges, **step.source_range_writes.upserts}
    for r in step.source_range_writes.deletes:
        del ranges[r]
    return LBState(services, backends, nodeports, ranges)


def test_frontend_entry_slots_and_backends() -> None:
    intent = NodeLBIntent(node="n", frontends=(fe("10.96.0.1", 80, "TCP", [("10.244.1.2", 8080), ("10.244.2.2", 8080)],
                                                   affinity_timeout=5),
                                                fe("10.96.0.1", 80, "UDP", [("10.244.1.2", 8080)]),
                                                fe("10.96.0.2", 81, "TCP", [], no_local_backends=True)))
    state = plan(intent, LBState(), **SIZES).desired
    master = state.services[ServiceKey(IPv4Address("10.96.0.1"), 80, 6, 0)]
    assert (master.count, master.flags, master.affinity_timeout) == (2, lb_planning.FLAG_AFFINITY, 5)
    udp = state.services[ServiceKey(IPv4Address("10.96.0.1"), 80, 17, 0)]
    assert udp.count == 1 and udp.backend_id != master.backend_id  # TCP and UDP: two frontends
    empty = state.services[ServiceKey(IPv4Address("10.96.0.2"), 81, 6, 0)]
    assert (empty.count, empty.flags) == (0, lb_planning.FLAG_NO_LOCAL)
    slot1 = state.services[ServiceKey(IPv4Address("10.96.0.1"), 80, 6, 1)]
    assert state.backends[slot1.backend_id] == lb_planning.Backend(IPv4Address("10.244.1.2"), 8080, 6)
    assert len(state.backends) == 3  # one per (address, port, protocol)


def test_ids_in_the_kernel_are_kept_and_new_ids_are_never_reused() -> None:
    first = plan(NodeLBIntent(node="n", frontends=(fe("10.96.0.1", 80, "TCP", [("10.244.1.2", 80)]),)),
                 LBState(), **SIZES).desired
    second = plan(NodeLBIntent(node="n", frontends=(fe("10.96.0.1", 80, "TCP", [("10.244.1.3", 80)]),
                                                     fe("10.96.0.9", 80, "TCP", []))), first, **SIZES).desired
    key = ServiceKey(IPv4Address("10.96.0.1"), 80, 6, 0)
    assert second.services[key].backend_id == first.services[key].backend_id
    used_before = {v.backend_id for v in first.services.values()} | set(first.backends)
    new_ids = ({v.backend_id for v in second.services.values()} | set(second.backends)) - used_before
    assert new_ids and min(new_ids) > max(used_before)


def test_capacity_is_checked_before_writing() -> None:
    intent = NodeLBIntent(node="n", frontends=(fe("10.96.0.1", 80, "TCP", [("10.244.1.2", 80), ("10.244.1.3", 80)]),))
    with pytest.raises(LBCapacityError) as caught:
        plan(intent, LBState(), services_size=2, backends_size=10)
    assert caught.value.map_name == "cy_lb4_svc" and caught.value.wanted == 3
    with pytest.raises(LBCapacityError):
        plan(intent, LBState(), services_size=10, backends_size=1)


frontends = st.lists(st.builds(
    lambda a, port, proto, bes, aff, kind, policy: FrontendIntent(
        service="ns/s", kind=kind, address=f"10.96.0.{a}", port=port, protocol=proto, affinity_timeout=aff,
        traffic_policy=policy, backends=tuple(BackendIntent(address=f"10.244.0.{b}", port=8080, node="nm"[b % 2])
                                              for b in bes)),
    st.integers(1, 4), st.sampled_from([53, 80]), st.sampled_from(["TCP", "UDP"]),
    st.lists(st.integers(1, 6), unique=True, max_size=4), st.sampled_from([0, 30]),
    st.sampled_from([FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT]), st.sampled_from(["Cluster", "Local"])),
    max_size=6, unique_by=lambda f: f.key)


@settings(max_examples=200, deadline=None)
@given(frontends, frontends)
def test_applying_the_plan_reaches_the_desired_state_in_a_safe_order(before: list[FrontendIntent],
                                                                     after: list[FrontendIntent]) -> None:
    start = plan(NodeLBIntent(node="n", frontends=tuple(before)), LBState(), **SIZES).desired
    step = plan(NodeLBIntent(node="n", frontends=tuple(after)), start, **SIZES)
    assert applied(start, step) == step.desired
    # a frontend's own entry (its count) is written after its slots, and deleted before them
    ups = list(step.service_writes.upserts)
    masters = [i for i, k in enumerate(ups) if k.slot == 0]
    slots = [i for i, k in enumerate(ups) if k.slot != 0]
    assert not masters or not slots or max(slots) < min(masters)
    # an external scope's own entry is written before the frontend entry that sends clients to it
    scoped = [i for i, k in enumerate(ups) if k.slot == 0 and k.scope]
    plain = [i for i, k in enumerate(ups) if k.slot == 0 and not k.scope]
    assert not scoped or not plain or max(scoped) < min(plain)
    dels = list(step.service_writes.deletes)
    assert [k.slot == 0 for k in dels] == sorted((k.slot == 0 for k in dels), reverse=True)
    # every slot a frontend counts points at an existing backend; a flagged frontend has its external scope
    for key, value in step.desired.services.items():
        if key.slot == 0:
            for slot in range(1, value.count + 1):
                entry = step.desired.services[ServiceKey(key.address, key.port, key.proto, slot, key.scope)]
                assert entry.backend_id in step.desired.backends
                if key.scope:
                    assert step.desired.backends[entry.backend_id].flags & lb_planning.BACKEND_LOCAL
            if value.flags & lb_planning.FLAG_EXT_LOCAL:
                assert ServiceKey(key.address, key.port, key.proto, 0, lb_planning.SCOPE_EXTERNAL) in \
                    step.desired.services
    # planning again from the result changes nothing
    again = plan(NodeLBIntent(node="n", frontends=tuple(after)), step.desired, **SIZES)
    assert len(again) == 0 and again.service_writes == MapDiff({}, ())


def test_nodeports_of_the_intent_are_the_bind_guards_keys() -> None:
    def np(address: str, port: int, protocol: str) -> FrontendIntent:
        return FrontendIntent(service="ns/s", kind=FrontendKind.NODE_PORT, address=address, port=port,
                              protocol=protocol)

    first = NodeLBIntent(node="n", frontends=(np("192.0.2.11", 30080, "TCP"), np("192.0.2.12", 30080, "TCP"),
                                               np("192.0.2.11", 30080, "UDP"), fe("10.96.0.1", 80, "TCP", [])))
    step = plan(first, LBState(), **SIZES)
    NP = lb_planning.NodePortKey
    assert step.desired.nodeports == {NP(30080, 6): 1, NP(30080, 17): 1}  # one key per port and protocol
    state = applied(LBState(), step)
    second = NodeLBIntent(node="n", frontends=(np("192.0.2.11", 30081, "TCP"),))
    step2 = plan(second, state, **SIZES)
    assert step2.nodeport_writes == MapDiff({NP(30081, 6): 1}, (NP(30080, 6), NP(30080, 17)))
    assert applied(state, step2).nodeports == {NP(30081, 6): 1}


def test_external_frontends_local_backends_and_the_local_policy_scope() -> None:
    """NodePort/ExternalIP/LoadBalancer are external; backends on the intent's node are local; a Local
    external frontend gets a scope-external set of its local backends (socket clients keep all)."""
    def be(address: str, node: str) -> BackendIntent:
        return BackendIntent(address=address, port=8080, node=node)

    intent = NodeLBIntent(node="n1", frontends=(
        FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address="10.96.0.1", port=80, protocol="TCP",
                       backends=(be("10.244.1.2", "n1"), be("10.244.2.2", "n2"))),
        FrontendIntent(service="ns/s", kind=FrontendKind.NODE_PORT, address="192.0.2.11", port=30080,
                       protocol="TCP", traffic_policy="Local", backends=(be("10.244.1.2", "n1"), be("10.244.2.2", "n2"))),
        FrontendIntent(service="ns/s", kind=FrontendKind.LOAD_BALANCER, address="203.0.113.1", port=80,
                       protocol="TCP", traffic_policy="Local", backends=(be("10.244.2.2", "n2"),)),
        FrontendIntent(service="ns/s", kind=FrontendKind.EXTERNAL_IP, address="203.0.113.2", port=80,
                       protocol="TCP", backends=(be("10.244.2.2", ""),))))
    state = plan(intent, LBState(), **SIZES).desired
    svc = state.services

    def key(address: str, port: int, slot: int = 0, scope: int = 0) -> ServiceKey:
        return ServiceKey(IPv4Address(address), port, 6, slot, scope)

    assert svc[key("10.96.0.1", 80)].flags == 0
    assert svc[key("192.0.2.11", 30080)].flags == lb_planning.FLAG_EXTERNAL | lb_planning.FLAG_EXT_LOCAL
    assert svc[key("192.0.2.11", 30080)].count == 2  # socket clients: the whole set
    ext = svc[key("192.0.2.11", 30080, 0, lb_planning.SCOPE_EXTERNAL)]
    assert (ext.count, ext.flags) == (1, lb_planning.FLAG_EXTERNAL)
    only = state.backends[svc[key("192.0.2.11", 30080, 1, lb_planning.SCOPE_EXTERNAL)].backend_id]
    assert (str(only.address), only.flags) == ("10.244.1.2", lb_planning.BACKEND_LOCAL | lb_planning.BACKEND_ON_NODE)
    lb_ext = svc[key("203.0.113.1", 80, 0, lb_planning.SCOPE_EXTERNAL)]
    assert (lb_ext.count, lb_ext.flags) == (0, lb_planning.FLAG_EXTERNAL | lb_planning.FLAG_NO_LOCAL)
    assert svc[key("203.0.113.2", 80)].flags == lb_planning.FLAG_EXTERNAL  # Cluster: no scope entries
    assert key("203.0.113.2", 80, 0, lb_planning.SCOPE_EXTERNAL) not in svc
    remote = state.backends[svc[key("203.0.113.2", 80, 1)].backend_id]
    assert remote.flags == 0  # node unknown: not local (SNAT)


def test_a_hybrid_hosts_cgroup_root_resolves_to_its_unified_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ciliary.nodeagent.datapath.lb_engine import cgroup2_dir

    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    assert cgroup2_dir(tmp_path) == tmp_path / "unified"
    (tmp_path / "cgroup.controllers").write_text("")
    assert cgroup2_dir(tmp_path) == tmp_path  # a cgroup2 directory is used as it is
    assert cgroup2_dir(tmp_path / "nowhere") == tmp_path / "nowhere"


def test_load_balancer_source_ranges_flag_the_frontend_and_fill_the_range_map() -> None:
    """IPv4 ranges go to the map under the frontend's id; an IPv6-only list still flags the frontend (it
    admits no IPv4 client); a change writes new ranges and deletes the old ones; no ranges: no flag."""
    def lb(address: str, ranges: tuple[str, ...]) -> FrontendIntent:
        return FrontendIntent(service="ns/s", kind=FrontendKind.LOAD_BALANCER, address=address, port=80,
                              protocol="TCP", source_ranges=ranges)

    SR = lb_planning.SourceRangeKey
    intent = NodeLBIntent(node="n", frontends=(lb("203.0.113.1", ("192.0.2.0/24", "2001:db8::/32")),
                                               lb("203.0.113.2", ("2001:db8::/32",)), lb("203.0.113.3", ())))
    state = applied(LBState(), plan(intent, LBState(), **SIZES))
    svc = {str(k.address): v for k, v in state.services.items() if k.slot == 0}
    flag = lb_planning.FLAG_SOURCE_RANGES
    assert svc["203.0.113.1"].flags & flag and svc["203.0.113.2"].flags & flag
    assert not svc["203.0.113.3"].flags & flag
    assert state.source_ranges == {SR(svc["203.0.113.1"].backend_id, IPv4Network("192.0.2.0/24")): 1}
    changed = NodeLBIntent(node="n", frontends=(lb("203.0.113.1", ("198.51.100.7/32",)),))
    step = plan(changed, state, **SIZES)
    ident = svc["203.0.113.1"].backend_id
    assert step.source_range_writes == MapDiff({SR(ident, IPv4Network("198.51.100.7/32")): 1},
                                               (SR(ident, IPv4Network("192.0.2.0/24")),))
    assert applied(state, step) == step.desired
    with pytest.raises(LBCapacityError, match="cy_lb4_srcrange"):
        plan(changed, state, **SIZES, source_ranges_size=1)


def test_dsr_flags_external_frontends_only() -> None:
    def fe(kind: FrontendKind, address: str, dsr: bool) -> FrontendIntent:
        return FrontendIntent(service="ns/s", kind=kind, address=address, port=80, protocol="TCP", dsr=dsr)

    intent = NodeLBIntent(node="n", frontends=(fe(FrontendKind.NODE_PORT, "192.0.2.1", True),
                                               fe(FrontendKind.LOAD_BALANCER, "203.0.113.1", False),
                                               fe(FrontendKind.CLUSTER_IP, "10.96.0.1", True)))
    state = applied(LBState(), plan(intent, LBState(), **SIZES))
    flags = {str(k.address): v.flags & lb_planning.FLAG_DSR for k, v in state.services.items() if k.slot == 0}
    assert flags == {"192.0.2.1": lb_planning.FLAG_DSR, "203.0.113.1": 0, "10.96.0.1": 0}
    # the backend's node believes an option naming a NodePort only when its own NodePort entry says DSR
    assert state.nodeports == {lb_planning.NodePortKey(80, 6): 1 | lb_planning.NODEPORT_DSR}


def test_a_backend_is_on_a_node_only_when_its_endpoint_names_one() -> None:
    def be(address: str, node: str) -> BackendIntent:
        return BackendIntent(address=address, port=8080, node=node)

    intent = NodeLBIntent(node="n", frontends=(FrontendIntent(
        service="ns/s", kind=FrontendKind.NODE_PORT, address="192.0.2.1", port=30080, protocol="TCP", dsr=True,
        backends=(be("10.244.1.2", "n"), be("10.244.2.2", "other"), be("198.51.100.9", ""))),))
    state = applied(LBState(), plan(intent, LBState(), **SIZES))
    flags = {str(b.address): b.flags for b in state.backends.values()}
    local, on_node = lb_planning.BACKEND_LOCAL, lb_planning.BACKEND_ON_NODE
    assert flags == {"10.244.1.2": local | on_node, "10.244.2.2": on_node, "198.51.100.9": 0}


def test_a_backend_keeps_its_id_when_only_its_flags_change() -> None:
    """An agent that starts setting a new flag (an upgrade) rewrites the flags under the same id: renumbering
    would move established north-south connections and affinity entries to other backends."""
    intent = NodeLBIntent(node="n", frontends=(FrontendIntent(
        service="ns/s", kind=FrontendKind.NODE_PORT, address="192.0.2.1", port=30080, protocol="TCP",
        backends=(BackendIntent(address="10.244.2.2", port=8080, node="other"),)),))
    state = applied(LBState(), plan(intent, LBState(), **SIZES))
    (ident, backend), = state.backends.items()
    older = dataclasses.replace(state, backends={ident: dataclasses.replace(backend, flags=0)})
    step = plan(intent, older, **SIZES)
    assert list(step.desired.backends) == [ident] and step.backend_deletes.deletes == ()
    assert step.backend_upserts.upserts == {ident: backend}
