"""LB IPAM (services.lb_ipam, services.lb_ipam_patches): who gets which LoadBalancer IP, and the status writes."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.api.lb_ippool import LBIPPool, LBIPPoolSpec, PoolInvalidError, parse_pool
from ciliary.operator.services.lb_ipam import CONDITION, ServiceClaim, allocate
from ciliary.operator.services.lb_ipam_patches import claim_from_body, pool_patch, service_patch

NOW = "2026-12-06T17:00:00Z"


def pool(name: str, *blocks: dict[str, str], created: str = "2026-01-01T00:00:00Z", **spec: object) -> LBIPPool:
    return LBIPPool(name, created, LBIPPoolSpec.model_validate({"blocks": list(blocks), **spec}))


def svc(name: str, created: str = "", **kw: object) -> ServiceClaim:
    return ServiceClaim(namespace="ns", name=name, created=created or f"2026-01-01T00:00:{len(name):02d}Z", **kw)


def test_services_get_the_lowest_free_address_in_creation_order_and_keep_it() -> None:
    pools = [pool("p", {"cidr": "192.0.2.0/30"})]
    first = allocate(pools, [svc("a"), svc("bb")])
    assert {k: o.ips for k, o in first.services.items()} == {"ns/a": ("192.0.2.0",), "ns/bb": ("192.0.2.1",)}
    assert first.pools["p"].total == 4 and first.pools["p"].used == 2 and first.pools["p"].available == 2
    # a restart, with a's address already held by cc (older): everybody keeps what they hold
    again = allocate(pools, [svc("a", holds=("192.0.2.0",)), svc("bb", holds=("192.0.2.1",)), svc("cc")])
    assert again.services["ns/cc"].ips == ("192.0.2.2",)
    assert again.services["ns/a"].ips == ("192.0.2.0",)


def test_first_and_last_of_a_cidr_only_when_allowed() -> None:
    got = allocate([pool("p", {"cidr": "192.0.2.0/30"}, allowFirstLastIPs="No")], [svc("a"), svc("bb"), svc("ccc")])
    assert [o.ips for o in got.services.values()] == [("192.0.2.1",), ("192.0.2.2",), ()]
    assert got.services["ns/ccc"].reason == "out_of_ips" and got.pools["p"].total == 2


def test_selectors_namespace_and_name_keys_disabled_pools_and_classes() -> None:
    pools = [pool("red", {"start": "198.51.100.1", "stop": "198.51.100.3"},
                  serviceSelector={"matchLabels": {"color": "red"}}),
             pool("ns-only", {"start": "198.51.100.9"},
                  serviceSelector={"matchExpressions": [{"key": "io.kubernetes.service.name", "operator": "In",
                                                         "values": ["named"]}]}),
             pool("off", {"cidr": "203.0.113.0/24"}, disabled=True)]
    got = allocate(pools, [svc("r", labels={"color": "red"}), svc("named"), svc("plain"),
                           svc("classy", load_balancer_class="example.com/other"), svc("cip", type="ClusterIP")])
    assert got.services["ns/r"].ips == ("198.51.100.1",)
    assert got.services["ns/named"].ips == ("198.51.100.9",)
    assert got.services["ns/plain"].reason == "no_pool"
    assert "ns/classy" not in got.services and "ns/cip" not in got.services  # left alone entirely
    # a disabled pool gives nothing new but what it gave stays
    assert allocate(pools, [svc("plain", holds=("203.0.113.5",))]).services["ns/plain"].ips == ("203.0.113.5",)


def test_overlapping_pools_the_younger_conflicts() -> None:
    old = pool("old", {"cidr": "192.0.2.0/29"}, created="2026-01-01T00:00:00Z")
    new = pool("new", {"start": "192.0.2.7", "stop": "192.0.2.9"}, created="2026-02-01T00:00:00Z")
    got = allocate([new, old], [])
    assert "overlaps block '192.0.2.0/29' from IP Pool 'old'" in got.pools["new"].conflict
    assert got.pools["old"].conflict == ""


def test_requested_ips_all_or_none() -> None:
    pools = [pool("p", {"cidr": "192.0.2.0/28"})]
    got = allocate(pools, [
        svc("a", annotations={"lbipam.cilium.io/ips": "192.0.2.5, 192.0.2.6"}),
        svc("bb", load_balancer_ip="192.0.2.6"),
        svc("ccc", annotations={"lbipam.cilium.io/ips": "10.9.9.9"}),
        svc("dddd", annotations={"lbipam.cilium.io/ips": "2001:db8::1"}),
        svc("eeeee", annotations={"lbipam.cilium.io/sharing-key": "k"}),
        svc("ffffff", ip_families=("IPv6",))])
    assert got.services["ns/a"].ips == ("192.0.2.5", "192.0.2.6")
    assert (got.services["ns/bb"].reason, got.services["ns/bb"].ips) == ("already_allocated", ())
    assert "ns/a" in got.services["ns/bb"].message
    assert got.services["ns/ccc"].reason == "no_pool" and "10.9.9.9" in got.services["ns/ccc"].message
    assert [got.services[k].reason for k in ("ns/dddd", "ns/eeeee", "ns/ffffff")] == ["unsupported"] * 3


def test_an_invalid_pool_is_refused_with_the_field() -> None:
    body = {"metadata": {"name": "bad"}, "spec": {"blocks": [{"start": "192.0.2.9", "stop": "192.0.2.1"}]}}
    try:
        parse_pool(body)
    except PoolInvalidError as exc:
        assert exc.pool == "bad" and "empty or mixes families" in exc.message
    else:
        raise AssertionError("accepted")


CLAIMS = st.lists(st.tuples(st.sampled_from(["red", "blue", None]), st.booleans(),
                            st.lists(st.integers(0, 40), max_size=2)), max_size=25)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CLAIMS, st.booleans())
def test_no_address_twice_every_address_from_a_pool_that_serves_the_service(raw: list, allow: bool) -> None:
    pools = [pool("a", {"cidr": "10.0.0.0/29"}, serviceSelector={"matchLabels": {"color": "red"}},
                  allowFirstLastIPs="Yes" if allow else "No"),
             pool("b", {"start": "10.0.0.16", "stop": "10.0.0.40"}, created="2026-03-01T00:00:00Z")]
    claims = [svc(f"s{i:02d}", labels={"color": color} if color else {},
                  annotations={"lbipam.cilium.io/ips": "10.0.0.20"} if wants else {},
                  holds=tuple(f"10.0.0.{h}" for h in holds)) for i, (color, wants, holds) in enumerate(raw)]
    got = allocate(pools, claims)
    given_out = [ip for o in got.services.values() for ip in o.ips]
    assert len(given_out) == len(set(given_out))
    for claim in claims:
        outcome = got.services[claim.key]
        assert outcome.satisfied == bool(outcome.ips)
        for ip in outcome.ips:
            n = int(ipaddress.ip_address(ip))
            in_a = (n - int(ipaddress.ip_address("10.0.0.0"))) in (range(8) if allow else range(1, 7))
            in_b = 16 <= n - int(ipaddress.ip_address("10.0.0.0")) <= 40
            assert (in_a and claim.labels.get("color") == "red") or in_b, (claim, ip)
    # the same input twice: the same answer (status written from it converges)
    assert allocate(pools, claims) == got


def test_service_patch_writes_only_what_changed_and_keeps_other_conditions() -> None:
    body = {"metadata": {"namespace": "ns", "name": "a", "generation": 2},
            "spec": {"type": "LoadBalancer"},
            "status": {"conditions": [{"type": "other", "status": "True"}]}}
    got = allocate([pool("p", {"cidr": "192.0.2.8/29"})], [claim_from_body(body)]).services["ns/a"]
    patch = service_patch(body, got, NOW)
    assert patch is not None
    assert patch["status"]["loadBalancer"] == {"ingress": [{"ip": "192.0.2.8", "ipMode": "VIP"}]}
    assert [c["type"] for c in patch["status"]["conditions"]] == ["other", CONDITION]
    written = {**body, "status": patch["status"]}
    assert service_patch(written, got, "2026-12-06T18:00:00Z") is None  # converged: nothing to write
    assert claim_from_body(written).holds == ("192.0.2.8",)


def test_pool_patch_counts_and_conflict() -> None:
    pools = [pool("p", {"cidr": "192.0.2.0/30"})]
    report = allocate(pools, [svc("a")]).pools["p"]
    patch = pool_patch({"metadata": {"name": "p", "generation": 1}}, report, "", NOW)
    assert patch is not None
    by_type = {c["type"]: c for c in patch["status"]["conditions"]}
    assert [by_type[f"cilium.io/{k}"]["message"] for k in ("IPsTotal", "IPsAvailable", "IPsUsed")] == ["4", "3", "1"]
    assert by_type["cilium.io/PoolConflict"]["status"] == "False"
    assert pool_patch({"metadata": {"name": "p", "generation": 1}, "status": patch["status"]}, report, "", NOW) is None
    refused = pool_patch({"metadata": {"name": "p"}}, None, "spec.blocks.0: bad", NOW)
    assert refused is not None and {c["type"]: c for c in refused["status"]["conditions"]}[
        "cilium.io/PoolConflict"]["status"] == "True"


def test_kept_addresses_beyond_the_first_are_released_and_requests_are_deduplicated() -> None:
    pools = [pool("p", {"cidr": "192.0.2.0/29"})]
    got = allocate(pools, [svc("a", holds=("192.0.2.1", "192.0.2.2")),
                           svc("bb", annotations={"lbipam.cilium.io/ips": "192.0.2.2,192.0.2.2"})])
    assert got.services["ns/a"].ips == ("192.0.2.1",)
    assert got.services["ns/bb"].ips == ("192.0.2.2",) and got.pools["p"].used == 2


def test_a_service_that_needs_ipv6_is_refused_and_ipv6_blocks_count_nothing() -> None:
    pools = [pool("p", {"cidr": "192.0.2.0/30"}, {"cidr": "2001:db8::/126"})]
    got = allocate(pools, [svc("a", ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack",
                               holds=("192.0.2.0",))])
    assert got.services["ns/a"].reason == "unsupported" and got.pools["p"].used == 0
    assert got.pools["p"].total == 4


class FakeCore:
    def __init__(self, fail: int = 0) -> None:
        self.patches: list[tuple[str, str, dict]] = []
        self.fail = fail

    async def patch_namespaced_service_status(self, name: str, namespace: str, body: dict, **_: object) -> dict:
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.fail:
            raise ApiException(status=self.fail, reason="Forbidden")
        self.patches.append((namespace, name, body))
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": namespace, "name": name},
                "spec": {"type": "LoadBalancer"}, **body}


class FakeCustom:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict]] = []

    async def patch_cluster_custom_object_status(self, group: str, version: str, plural: str, name: str,
                                                 body: dict, **_: object) -> dict:
        self.patches.append((name, body))
        return body


class FakeApi:
    @staticmethod
    def sanitize_for_serialization(obj: object) -> object:
        return obj


def reconciler(fail: int = 0):  # type: ignore[no-untyped-def]
    from ciliary.operator.kube.service_model import ServiceModel
    from ciliary.operator.lb_ipam_reconciling import LBIPAMReconciler, PoolModel

    services, pools = ServiceModel(), PoolModel()
    rec = LBIPAMReconciler(services, pools, FakeApi())  # type: ignore[arg-type]
    rec.core, rec.custom = FakeCore(fail), FakeCustom()  # type: ignore[assignment]
    return rec, services, pools


def lb_body(name: str, **spec: object) -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], **spec}}


def test_the_loop_sleeps_without_pools_then_writes_once_and_converges() -> None:
    import asyncio

    rec, services, pools = reconciler()
    services.set_service(lb_body("a"))
    assert asyncio.run(rec.run_once()) == 0 and rec.core.patches == []  # dormant: no pool, nothing managed
    pools.set_pool({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": {"blocks": [{"cidr": "192.0.2.0/30"}]}})
    assert asyncio.run(rec.run_once()) == 2  # the Service's status and the pool's
    assert services.bodies["ns/a"]["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.0", "ipMode": "VIP"}]
    pools.set_pool({**pools.bodies["p"], "status": rec.custom.patches[-1][1]["status"]})
    assert asyncio.run(rec.run_once()) == 0  # its own writes plan nothing more
    # the Service becomes a ClusterIP: LB IPAM takes back its IP and its condition
    services.set_service({**services.bodies["ns/a"], "spec": {"type": "ClusterIP"}})
    asyncio.run(rec.run_once())
    released = rec.core.patches[-1][2]["status"]
    assert released["loadBalancer"] == {"ingress": []} and released["conditions"] == []
    # every pool gone: a Service LB IPAM still manages reads no_pool; one it never touched is left alone
    services.set_service(lb_body("b", type="LoadBalancer"))
    asyncio.run(rec.run_once())
    pools.set_pool(pools.bodies["p"], deleted=True)
    services.set_service(lb_body("untouched"))
    asyncio.run(rec.run_once())
    last = {name: body for _, name, body in rec.core.patches}
    assert last["b"]["status"]["loadBalancer"] == {"ingress": []} and "untouched" not in last
    assert [c["reason"] for c in last["b"]["status"]["conditions"]] == ["no_pool"]


def test_a_refused_write_is_logged_and_the_pass_goes_on(caplog) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    rec, services, pools = reconciler(fail=403)
    pools.set_pool({"metadata": {"name": "p"}, "spec": {"blocks": [{"cidr": "192.0.2.0/30"}]}})
    services.set_service(lb_body("a"))
    assert asyncio.run(rec.run_once()) == 1  # the pool's status only
    assert "status of Service ns/a not written: 403 Forbidden" in caplog.text
