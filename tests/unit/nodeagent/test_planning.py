"""planning.plan: tables of (observed, desired) -> expected changes."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from ciliary.nodeagent import planning
from ciliary.nodeagent.planning import Attachment, DatapathState, EndpointValue, HostVeth, MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

PROGRAMS = {"from_pod": "a" * 64, "to_pod": "b" * 64}
A, B, C = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3"), IPv4Address("10.0.0.4")
VETH = {A: HostVeth("cy00000000001", 11), B: HostVeth("cy00000000002", 12), C: HostVeth("cy00000000003", 13)}

ALLOW_80 = PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW)
DENY_ANY = PolicyEntry(identity=1003, verdict=Verdict.DENY)


def endpoint(ip: IPv4Address, identity: int, ingress: DirectionPolicy | None = None,
             egress: DirectionPolicy | None = None) -> intents.EndpointIntent:
    return intents.EndpointIntent(namespace="ns", pod=f"p{identity}", ipv4=str(ip), identity=identity,
                                  ingress=ingress or DirectionPolicy(), egress=egress or DirectionPolicy())


def intent(*endpoints: intents.EndpointIntent, ipcache: dict[str, int] | None = None) -> intents.NodeIntent:
    return intents.NodeIntent(node="n1", revision=7, endpoints=endpoints, ipcache=tuple(
        intents.IpcacheEntry(cidr=c, identity=i) for c, i in (ipcache or {}).items()))


def attached(*ips: IPv4Address, programs: dict[str, str] = PROGRAMS) -> frozenset[Attachment]:
    return frozenset(Attachment(VETH[ip].ifname, VETH[ip].ifindex, hook, programs[hook])
                     for ip in ips for hook in planning.HOOKS)


def applied(desired: intents.NodeIntent, veths: dict[IPv4Address, HostVeth]) -> DatapathState:
    """The state after a plan for ``desired`` was fully applied to an empty node."""
    p = planning.plan(desired, DatapathState(), programs=PROGRAMS, veths=veths)
    return DatapathState(programs=PROGRAMS, attachments=frozenset(p.attach), ipcache=dict(p.ipcache.upserts),
                         endpoints={**p.endpoints.upserts, **p.stamps.upserts}, policy=dict(p.policy.upserts),
                         policy_deny=dict(p.policy_deny.upserts), ep_ifindex=dict(p.ep_ifindex.upserts))


def test_empty_node_gets_everything() -> None:
    desired = intent(endpoint(A, 1001), endpoint(B, 1002, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))),
                     ipcache={"10.0.0.0/24": 5000})
    p = planning.plan(desired, DatapathState(), programs=PROGRAMS, veths={A: VETH[A], B: VETH[B]})
    assert p.compile == ("from_pod", "to_pod")
    assert set(p.attach) == attached(A, B)
    assert p.detach == ()
    assert p.endpoint_ids == {A: 1, B: 2}
    assert p.endpoints.upserts[B] == EndpointValue(2, 1002, planning.EP_INGRESS_ENFORCED, 12)
    assert p.ipcache.upserts == {IPv4Network("10.0.0.0/24"): planning.IpcacheValue(5000)}
    assert list(p.policy.upserts) == [planning.PolicyKey(2, MapDirection.INGRESS, 1001, 6, 80, 16)]
    assert not p.policy_deny


def test_same_intent_again_is_a_no_op() -> None:
    desired = intent(endpoint(A, 1001, egress=DirectionPolicy(enforced=True, entries=(ALLOW_80, DENY_ANY))))
    state = applied(desired, {A: VETH[A]})
    p = planning.plan(desired, state, programs=PROGRAMS, veths={A: VETH[A]})
    assert p.empty and p.map_writes == 0


POLICY_CHANGES = [
    pytest.param((ALLOW_80,), (ALLOW_80, DENY_ANY), 0, 1, 0, id="add a deny (and its endpoint flag)"),
    pytest.param((ALLOW_80, DENY_ANY), (ALLOW_80,), 0, 0, 1, id="remove a deny (and its endpoint flag)"),
    pytest.param((ALLOW_80,), (ALLOW_80.model_copy(update={"port_high": 81}),), 1, 0, 1,
                 id="80 -> 80-81: one new block, one gone"),
    pytest.param((ALLOW_80,), (ALLOW_80.model_copy(update={"port_low": 8000, "port_high": 8100}),), 4, 0, 1,
                 id="a range is 4 blocks"),
]


@pytest.mark.parametrize(("before", "after", "allow_upserts", "deny_upserts", "deletes"), POLICY_CHANGES)
def test_policy_change_is_map_writes_only(before: tuple[PolicyEntry, ...], after: tuple[PolicyEntry, ...],
                                          allow_upserts: int, deny_upserts: int, deletes: int) -> None:
    old = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=before)))
    new = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=after)))
    p = planning.plan(new, applied(old, {A: VETH[A]}), programs=PROGRAMS, veths={A: VETH[A]})
    assert p.compile == () and p.attach == () and p.detach == ()
    assert len(p.policy.upserts) == allow_upserts
    assert len(p.policy_deny.upserts) == deny_upserts
    assert len(p.policy.deletes) + len(p.policy_deny.deletes) == deletes
    assert not p.endpoints


def test_deny_flag_is_raised_before_deny_entries_and_lowered_after_them() -> None:
    allow_only = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))))
    with_deny = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80, DENY_ANY))))
    enforced, raised = planning.EP_INGRESS_ENFORCED, planning.EP_INGRESS_ENFORCED | planning.EP_INGRESS_DENY
    add = planning.plan(with_deny, applied(allow_only, {A: VETH[A]}), programs=PROGRAMS, veths={A: VETH[A]})
    assert add.raise_deny_flags.upserts == {A: EndpointValue(1, 1001, raised, 11, 7)}
    assert not add.endpoints and not add.lower_deny_flags
    remove = planning.plan(allow_only, applied(with_deny, {A: VETH[A]}), programs=PROGRAMS, veths={A: VETH[A]})
    assert remove.lower_deny_flags.upserts == {A: EndpointValue(1, 1001, enforced, 11, 7)}
    assert not remove.endpoints and not remove.raise_deny_flags
    order = [(name, kind) for name, kind, diff in planning.write_order(remove) if diff]
    assert order.index(("policy_deny", "deletes")) < order.index(("endpoints", "upserts"))


def test_new_endpoint_with_deny_entries_is_written_once_with_its_flag() -> None:
    desired = intent(endpoint(A, 1001, egress=DirectionPolicy(entries=(DENY_ANY,))))
    p = planning.plan(desired, DatapathState(), programs=PROGRAMS, veths={A: VETH[A]})
    assert p.endpoints.upserts == {A: EndpointValue(1, 1001, planning.EP_EGRESS_DENY, 11)}
    assert not p.raise_deny_flags and not p.lower_deny_flags


def test_enforcement_flag_change_rewrites_only_the_endpoint() -> None:
    old = intent(endpoint(A, 1001))
    new = intent(endpoint(A, 1001, egress=DirectionPolicy(enforced=True)))
    p = planning.plan(new, applied(old, {A: VETH[A]}), programs=PROGRAMS, veths={A: VETH[A]})
    assert p.endpoints.upserts == {A: EndpointValue(1, 1001, planning.EP_EGRESS_ENFORCED, 11, 7)}
    assert p.map_writes == 1


def test_rendered_hash_change_compiles_and_replaces_every_attachment() -> None:
    desired = intent(endpoint(A, 1001))
    state = applied(desired, {A: VETH[A]})
    new_programs = {"from_pod": "c" * 64, "to_pod": PROGRAMS["to_pod"]}
    p = planning.plan(desired, state, programs=new_programs, veths={A: VETH[A]})
    assert p.compile == ("from_pod",)
    assert p.attach == (Attachment(VETH[A].ifname, 11, "from_pod", "c" * 64),)
    assert p.map_writes == 0


def test_pod_gone_detaches_and_deletes_its_entries_keeping_other_ids() -> None:
    both = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))),
                  endpoint(B, 1002, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))))
    state = applied(both, {A: VETH[A], B: VETH[B]})
    only_b = intent(endpoint(B, 1002, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))))
    p = planning.plan(only_b, state, programs=PROGRAMS, veths={B: VETH[B]})
    assert p.endpoint_ids == {B: 2}
    assert p.endpoints.deletes == (A,)
    assert [k.ep_id for k in p.policy.deletes] == [1]
    assert set(p.detach) == attached(A)
    assert p.attach == ()


def test_new_pod_takes_the_smallest_free_id() -> None:
    state = applied(intent(endpoint(A, 1001), endpoint(C, 1003)), {A: VETH[A], C: VETH[C]})
    state = DatapathState(**{**state.__dict__, "endpoints": {C: state.endpoints[C]}})  # A's id 1 is free
    p = planning.plan(intent(endpoint(B, 1002), endpoint(C, 1003)), state, programs=PROGRAMS,
                      veths={B: VETH[B], C: VETH[C]})
    assert p.endpoint_ids == {B: 1, C: 2}


def test_an_address_behind_a_new_veth_is_a_new_endpoint() -> None:
    """A new pod got A's address before the old pod's removal was applied: new id (the old one is not reused),
    so the conntrack purge sees a replacement; the old id's entries are deleted, the new veth attached."""
    policy = DirectionPolicy(enforced=True, entries=(ALLOW_80,))
    state = applied(intent(endpoint(A, 1001, ingress=policy), endpoint(B, 1002)), {A: VETH[A], B: VETH[B]})
    assert {ip: v.ep_id for ip, v in state.endpoints.items()} == {A: 1, B: 2}
    new_veth = HostVeth("cy00000000009", 19)
    p = planning.plan(intent(endpoint(A, 1001, ingress=policy), endpoint(B, 1002)), state, programs=PROGRAMS,
                      veths={A: new_veth, B: VETH[B]})
    assert p.endpoint_ids == {A: 3, B: 2}
    assert p.endpoints.upserts[A].ep_id == 3 and p.endpoints.upserts[A].ifindex == 19
    assert [k.ep_id for k in p.policy.deletes] == [1] and [k.ep_id for k in p.policy.upserts] == [3]
    assert p.ep_ifindex.upserts == {19: A} and p.ep_ifindex.deletes == (11,)
    # the same veth again (an agent restart reading the pins back) keeps the id
    same = planning.plan(intent(endpoint(A, 1001, ingress=policy), endpoint(B, 1002)), state, programs=PROGRAMS,
                         veths={A: VETH[A], B: VETH[B]})
    assert same.endpoint_ids == {A: 1, B: 2} and same.map_writes == 0


def test_endpoint_without_a_veth_is_reported_not_programmed() -> None:
    p = planning.plan(intent(endpoint(A, 1001), endpoint(B, 1002)), DatapathState(), programs=PROGRAMS,
                      veths={A: VETH[A]})
    assert p.unplaced == (B,)
    assert set(p.endpoints.upserts) == {A}


def test_veth_ifindex_change_reattaches() -> None:
    desired = intent(endpoint(A, 1001))
    state = applied(desired, {A: VETH[A]})
    moved = {A: HostVeth(VETH[A].ifname, 99)}
    p = planning.plan(desired, state, programs=PROGRAMS, veths=moved)
    assert {a.ifindex for a in p.attach} == {99}
    assert p.endpoints.upserts[A].ifindex == 99


def test_adopted_unknown_program_is_replaced() -> None:
    desired = intent(endpoint(A, 1001))
    state = applied(desired, {A: VETH[A]})
    unknown = frozenset(Attachment(a.ifname, a.ifindex, a.hook, "") for a in state.attachments)
    p = planning.plan(desired, DatapathState(**{**state.__dict__, "attachments": unknown}), programs=PROGRAMS,
                      veths={A: VETH[A]})
    assert set(p.attach) == attached(A)


def test_overlapping_entries_of_one_verdict_share_keys_deterministically() -> None:
    r = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="n", name="p", rule_index=0, section="ingress[0]")
    e1 = ALLOW_80.model_copy(update={"rules": (r,)})
    d1 = planning.direction_maps(1, MapDirection.INGRESS, DirectionPolicy(enforced=True, entries=(e1, ALLOW_80)))
    d2 = planning.direction_maps(1, MapDirection.INGRESS, DirectionPolicy(enforced=True, entries=(ALLOW_80, e1)))
    assert d1 == d2
    assert list(d1[0].values()) == [planning.PolicyValue(0)]


def test_revision_stamp_is_the_last_write_of_every_endpoint() -> None:
    """Each endpoint's revision is written after every other write of that revision (and only then)."""
    old = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80, DENY_ANY))),
                 endpoint(B, 1002))
    state = applied(old, {A: VETH[A], B: VETH[B]})
    assert {ip: v.revision for ip, v in state.endpoints.items()} == {A: 7, B: 7}
    new = intent(endpoint(A, 1001, ingress=DirectionPolicy(enforced=True, entries=(ALLOW_80,))),
                 endpoint(B, 1002), endpoint(C, 1003)).model_copy(update={"revision": 8})
    p = planning.plan(new, state, programs=PROGRAMS, veths=VETH)
    assert all(v.revision == 7 for v in p.lower_deny_flags.upserts.values())
    assert p.endpoints.upserts[C].revision == 0  # a new endpoint: unstamped until the end
    assert {ip: v.revision for ip, v in p.stamps.upserts.items()} == {A: 8, B: 8, C: 8}
    steps = [(name, kind) for name, kind, diff in planning.write_order(p) if diff]
    assert steps[-1] == ("endpoints", "upserts") and planning.write_order(p)[-1][2] is p.stamps
    # the same revision again: nothing to stamp
    again = planning.plan(new, applied(new, VETH), programs=PROGRAMS, veths=VETH)
    assert again.empty
    assert planning.revision_stamp(2**32 + 5) == 5
