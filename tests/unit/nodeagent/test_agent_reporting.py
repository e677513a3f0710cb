"""Report contents from enforcement outcomes, diffing that ignores lastUpdated, and the lease-bound writer."""

from __future__ import annotations

from types import SimpleNamespace

from ciliary.nodeagent import enforcing, reporting
from ciliary.operator import intents
from ciliary.operator.status import reports
from ciliary.operator.store import keyspace

NODE = "n1"
P1 = intents.PolicyRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", generation=3)
P2 = intents.PolicyRef(kind="CiliumClusterwideNetworkPolicy", name="cw", uid="u2", generation=1)


def intent(revision: int, *policies: intents.PolicyRef) -> intents.NodeIntent:
    return intents.NodeIntent(node=NODE, revision=revision, policies=policies)


def test_applied_intent_reports_every_policy_ok_and_enforcing() -> None:
    i = intent(7, P1, P2)
    out = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=i, applied=i, endpoints=2),
                                    now="t")
    status = out[keyspace.node_status_key(NODE)]
    assert isinstance(status, reports.NodeStatusReport)
    assert status.applied_revision == 7 and status.enforcing and status.error == "" and status.endpoints == 2
    r1 = out[keyspace.report_key("u1", NODE)]
    assert isinstance(r1, reports.PolicyReport)
    assert (r1.ok, r1.enforcing, r1.generation, r1.local_policy_revision) == (True, True, 3, 7)
    assert keyspace.report_key("u2", NODE) in out


def test_failed_apply_keeps_old_policy_enforcing_and_new_one_not() -> None:
    old = intent(7, P1)
    new = intent(8, P1.model_copy(update={"generation": 4}), P2)
    outcome = enforcing.Outcome(started=True, wanted=new, applied=old, error="map cy_policy needs 9 entries",
                                error_kind="MapFull")
    out = reporting.desired_reports(NODE, outcome, now="t")
    r1, r2 = out[keyspace.report_key("u1", NODE)], out[keyspace.report_key("u2", NODE)]
    assert isinstance(r1, reports.PolicyReport) and isinstance(r2, reports.PolicyReport)
    assert (r1.ok, r1.enforcing, r1.generation, r1.local_policy_revision) == (False, True, 3, 7)
    assert (r2.ok, r2.enforcing, r2.generation) == (False, False, 1)
    assert "cy_policy" in r1.error and r1.annotations == {"errorKind": "MapFull"}
    assert out[keyspace.node_status_key(NODE)].error == "map cy_policy needs 9 entries"


def test_invalid_intent_marks_policies_in_force_not_ok_but_enforcing() -> None:
    old = intent(7, P1)
    outcome = enforcing.Outcome(started=True, wanted=old, applied=old, error="unknown schema version 2",
                                error_kind="InvalidIntent")
    r1 = reporting.desired_reports(NODE, outcome, now="t")[keyspace.report_key("u1", NODE)]
    assert isinstance(r1, reports.PolicyReport)
    assert (r1.ok, r1.enforcing, r1.error) == (False, True, "unknown schema version 2")


def test_diff_ignores_last_updated_and_deletes_departed_policies() -> None:
    i = intent(7, P1, P2)
    first = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=i, applied=i), now="t1")
    again = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=i, applied=i), now="t2")
    assert reporting.plan_writes(first, again) == ({}, [])
    j = intent(8, P1)
    later = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=j, applied=j), now="t3")
    puts, deletes = reporting.plan_writes(first, later)
    assert set(puts) == {keyspace.node_status_key(NODE), keyspace.report_key("u1", NODE)}
    assert deletes == [keyspace.report_key("u2", NODE)]


class FakeClient:
    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, int]] = {}
        self.puts = 0

    async def put(self, key: bytes, value: bytes, lease=None):
        self.kv[key] = (value, lease.id if lease else 0)
        self.puts += 1

    async def delete(self, key: bytes):
        self.kv.pop(key, None)

    async def get(self, key: bytes):
        if key not in self.kv:
            return None
        value, lease = self.kv[key]
        return SimpleNamespace(key=key, value=value, lease=lease)

    async def get_prefix(self, prefix: bytes):
        return [SimpleNamespace(key=k, value=v, lease=lease) for k, (v, lease) in sorted(self.kv.items())
                if k.startswith(prefix)]


def mine(key: bytes) -> bool:
    """This node's status key or one of its reports."""
    text = key.decode()
    return text == keyspace.node_status_key(NODE) or text.startswith(keyspace.node_reports_prefix(NODE))


async def test_reporter_writes_under_the_lease_only_on_change_and_rewrites_for_a_new_lease() -> None:
    client = FakeClient()
    # a stale report of a previous agent process (another lease) for a policy no longer here
    stale = keyspace.report_key("gone", NODE).encode()
    client.kv[stale] = (b"{}", 5)
    client.kv[keyspace.report_key("gone", "n2").encode()] = (b"{}", 6)  # another node's: untouched
    client.kv[keyspace.report_key("gone", "n10").encode()] = (b"{}", 6)  # n1 is a prefix of n10: untouched
    i = intent(7, P1)
    state = {"lease": SimpleNamespace(id=10), "outcome": enforcing.Outcome(started=True, wanted=i, applied=i)}
    clock = iter(f"t{n}" for n in range(100))
    reporter = reporting.Reporter(node=NODE, lease=lambda: state["lease"], client=lambda: client,
                                  outcome=lambda: state["outcome"], now=lambda: next(clock))
    assert await reporter.sync_once()
    assert stale not in client.kv and keyspace.report_key("gone", "n2").encode() in client.kv
    assert keyspace.report_key("gone", "n10").encode() in client.kv
    assert {lease for k, (_, lease) in client.kv.items() if mine(k)} == {10}
    writes = client.puts
    assert await reporter.sync_once()
    assert client.puts == writes  # nothing changed but the time
    state["lease"] = SimpleNamespace(id=11)
    assert await reporter.sync_once()
    assert client.puts == writes + 2
    assert {lease for k, (_, lease) in client.kv.items() if mine(k)} == {11}
    state["lease"] = None
    assert not await reporter.sync_once()


def test_a_policy_is_enforcing_only_where_the_kernel_shows_every_local_endpoint_at_the_revision() -> None:
    def ep(pod: str, ip: str, *uids: str) -> intents.EndpointIntent:
        return intents.EndpointIntent(namespace="ns", pod=pod, ipv4=ip, identity=300, policies=uids)

    i = intents.NodeIntent(node=NODE, revision=7, policies=(P1, P2), endpoints=(
        ep("a", "10.0.0.1", "u1"), ep("b", "10.0.0.2", "u1", "u2"), ep("gone", "10.0.0.9", "u2")))
    local = frozenset({"10.0.0.1", "10.0.0.2"})  # "gone" has no veth here: nothing to enforce it on

    def reps(kernel: dict[str, int] | None) -> tuple[reports.PolicyReport, reports.PolicyReport]:
        out = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=i, applied=i,
                                                                kernel_endpoints=kernel, local_endpoints=local),
                                        now="t")
        r1, r2 = out[keyspace.report_key("u1", NODE)], out[keyspace.report_key("u2", NODE)]
        assert isinstance(r1, reports.PolicyReport) and isinstance(r2, reports.PolicyReport)
        return r1, r2

    r1, r2 = reps({"10.0.0.1": 7, "10.0.0.2": 7})
    assert (r1.enforcing, r1.error, r2.enforcing) == (True, "", True)
    r1, r2 = reps({"10.0.0.2": 7})  # a missing from the kernel's map: only u1 selects it
    assert (r1.ok, r1.enforcing, r2.enforcing) == (True, False, True)
    assert "ns/a (10.0.0.1)" in r1.error and "revision 7" in r1.error
    r1, r2 = reps({"10.0.0.1": 7, "10.0.0.2": 6})  # b still at an older revision
    assert (r1.enforcing, r2.enforcing) == (False, False) and "ns/b" in r2.error
    r1, r2 = reps(None)  # the map could not be read: nothing is claimed
    assert (r1.enforcing, r2.enforcing) == (False, False)
    failed = enforcing.Outcome(started=True, wanted=i, applied=i, error="x", error_kind="MapFull",
                               kernel_endpoints={"10.0.0.2": 7}, local_endpoints=local)
    r1 = reporting.desired_reports(NODE, failed, now="t")[keyspace.report_key("u1", NODE)]
    assert isinstance(r1, reports.PolicyReport) and (r1.ok, r1.enforcing) == (False, False)


def test_a_broken_datapath_enforces_nothing_even_with_every_stamp_in_place() -> None:
    """A program detached or a pin gone after the apply: the stamps stay, but nothing counts as enforcing."""
    i = intents.NodeIntent(node=NODE, revision=7, policies=(P1,), endpoints=(
        intents.EndpointIntent(namespace="ns", pod="a", ipv4="10.0.0.1", identity=300, policies=("u1",)),))
    broken = ("cy_to_pod is not attached to cy0123456789a",)
    for outcome in (
            enforcing.Outcome(started=True, wanted=i, applied=i, kernel_endpoints={"10.0.0.1": 7},
                              local_endpoints=frozenset({"10.0.0.1"}), datapath_problems=broken),
            enforcing.Outcome(started=True, wanted=i, applied=i, error="x", error_kind="AttachFailed",
                              kernel_endpoints={"10.0.0.1": 7}, local_endpoints=frozenset({"10.0.0.1"}),
                              datapath_problems=broken)):
        out = reporting.desired_reports(NODE, outcome, now="t")
        report, status = out[keyspace.report_key("u1", NODE)], out[keyspace.node_status_key(NODE)]
        assert isinstance(report, reports.PolicyReport) and not report.enforcing
        assert "datapath broken" in report.error or report.error == "x"
        assert isinstance(status, reports.NodeStatusReport) and not status.enforcing
    healthy = enforcing.Outcome(started=True, wanted=i, applied=i, kernel_endpoints={"10.0.0.1": 7},
                                local_endpoints=frozenset({"10.0.0.1"}))
    report = reporting.desired_reports(NODE, healthy, now="t")[keyspace.report_key("u1", NODE)]
    assert isinstance(report, reports.PolicyReport) and report.enforcing  # the same outcome, unbroken: enforcing


def test_policy_needing_the_dns_proxy_is_not_enforcing_while_it_cannot() -> None:
    rule = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", rule_index=0,
                           section="egress[0]")
    dns = intents.PolicyEntry(identity=0, protocol=intents.Protocol.UDP, port_low=53, verdict=intents.Verdict.ALLOW,
                              l7_redirect=True, l7_parser="dns", rules=(rule,))
    fqdn = intents.PolicyEntry(identity=(2 << 24) + 1, verdict=intents.Verdict.ALLOW,
                               rules=(rule.model_copy(update={"uid": "u2"}),))
    i = intents.NodeIntent(node=NODE, revision=7, policies=(P1, P2), endpoints=(intents.EndpointIntent(
        namespace="default", pod="p", ipv4="10.0.0.2", identity=300, policies=("u1", "u2"),
        egress=intents.DirectionPolicy(enforced=True, entries=(dns, fqdn))),),
        fqdn_selectors={(2 << 24) + 1: intents.DNSRule(match_name="a.test")})
    assert reporting.proxy_parsers(i, "u1") == {"dns"} and reporting.proxy_parsers(i, "u2") == {"dns"}
    down = enforcing.Outcome(started=True, wanted=i, applied=i, proxy_problems={"dns": "DNS proxy not running: x"})
    for uid in ("u1", "u2"):
        report = reporting.desired_reports(NODE, down, now="t")[keyspace.report_key(uid, NODE)]
        assert isinstance(report, reports.PolicyReport)
        assert (report.ok, report.enforcing, report.error) == (True, False, "DNS proxy not running: x")
    up = enforcing.Outcome(started=True, wanted=i, applied=i, proxy_problems={"dns": ""})
    report = reporting.desired_reports(NODE, up, now="t")[keyspace.report_key("u1", NODE)]
    assert isinstance(report, reports.PolicyReport) and report.enforcing and report.error == ""
    # a policy without such entries is unaffected by a proxy problem
    plain = intent(7, P1)
    report = reporting.desired_reports(NODE, enforcing.Outcome(started=True, wanted=plain, applied=plain,
                                                               proxy_problems={"dns": "down"}), now="t")[
        keyspace.report_key("u1", NODE)]
    assert isinstance(report, reports.PolicyReport) and report.enforcing


def test_a_policy_whose_l7_rules_have_no_proxy_here_names_the_missing_proxy() -> None:
    """--dns-proxy-port 0, egress HTTP or ingress Kafka: the datapath drops that traffic; the node says why."""
    rule = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="rule1", uid="u1", rule_index=0,
                           section="egress[0]")

    def l7(parser: str, port: int) -> intents.PolicyEntry:
        return intents.PolicyEntry(identity=0, protocol=intents.Protocol.TCP, port_low=port,
                                   verdict=intents.Verdict.ALLOW, l7_redirect=True, l7_parser=parser,  # type: ignore[arg-type]
                                   rules=(rule,))

    def report_of(ingress: tuple[intents.PolicyEntry, ...], egress: tuple[intents.PolicyEntry, ...],
                  problems: dict[str, str], egress_proxies: set[str] | None) -> reports.PolicyReport:
        i = intents.NodeIntent(node=NODE, revision=7, policies=(P1,), endpoints=(intents.EndpointIntent(
            namespace="default", pod="p", ipv4="10.0.0.2", identity=300, policies=("u1",),
            ingress=intents.DirectionPolicy(enforced=bool(ingress), entries=ingress),
            egress=intents.DirectionPolicy(enforced=bool(egress), entries=egress)),))
        outcome = enforcing.Outcome(started=True, wanted=i, applied=i, proxy_problems=problems)
        report = reporting.desired_reports(NODE, outcome, now="t", egress_proxies=egress_proxies)[
            keyspace.report_key("u1", NODE)]
        assert isinstance(report, reports.PolicyReport)
        return report

    # egress HTTP with the DNS proxy running (and no egress HTTP proxy): dropped, so not enforcing
    r = report_of((), (l7("http", 80),), {"dns": ""}, {"dns"})
    assert not r.enforcing and "no egress http proxy" in r.error and "PROXY_UNAVAILABLE" in r.error
    r = report_of((), (l7("http", 80),), {"dns": ""}, None)  # the kinds in the problems, Envoy's "http" aside
    assert not r.enforcing and "no egress http proxy" in r.error
    readable = l7("http", 80).model_copy(update={"http": (intents.HttpRule(method="GET"),)})
    assert "no egress http proxy" not in report_of((), (readable,), {"dns": ""}, {"dns", "http"}).error  # wired up
    # HTTP inside TLS on egress (no HTTP rules Envoy reads): dropped even with the egress proxy wired up
    r = report_of((), (l7("http", 443),), {"dns": "", "http": ""}, {"dns", "http"})
    assert not r.enforcing and "no egress http proxy" in r.error
    # DNS rules without a DNS proxy (--dns-proxy-port 0): no port in the datapath
    r = report_of((), (l7("dns", 53),), {}, set())
    assert not r.enforcing and "no egress dns proxy" in r.error
    # Kafka on ingress: no node has a Kafka proxy
    r = report_of((l7("kafka", 9092),), (), {"dns": ""}, {"dns"})
    assert not r.enforcing and "no ingress kafka proxy" in r.error
    # HTTP inside TLS on ingress (no HTTP rules Envoy reads): not Envoy's, even while Envoy runs
    r = report_of((l7("http", 443),), (), {"dns": "", "http": ""}, {"dns"})
    assert not r.enforcing and "no ingress http proxy" in r.error
