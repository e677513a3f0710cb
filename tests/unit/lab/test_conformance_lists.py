"""The upstream e2e focus lists (``e2e/conformance.txt``, ``e2e/conformance/*.txt``): every skip says why,
and each list selects what its comments claim from the spec names of the pinned e2e.test (a sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.lab import conformance

ROOT = Path(__file__).resolve().parents[3]
LISTS = sorted((ROOT / "e2e" / "conformance").glob("*.txt")) + [ROOT / "e2e" / "conformance.txt"]

#: spec names as the pinned e2e.test --list-tests prints them (a sample of each kind the lists decide on)
NETPOL_RUN = [
    "[sig-network] Netpol API should support creating NetworkPolicy API operations",
    "[sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy "
    "[Feature:NetworkPolicy]",
    "[sig-network] Netpol NetworkPolicy between server and client should not mistakenly treat 'protocol: SCTP' as "
    "'protocol: TCP', even if the plugin doesn't support SCTP [Feature:NetworkPolicy]",
    "[sig-network] Netpol [LinuxOnly] NetworkPolicy between server and client using UDP should enforce policy based "
    "on Ports [Feature:NetworkPolicy]",
]
NETPOL_LEFT_OUT = [
    "[sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly] NetworkPolicy between server and client using SCTP "
    "should enforce policy based on Ports [Feature:NetworkPolicy]",
    "[sig-network] Netpol NetworkPolicy between server and client should allow egress access to server in CIDR block "
    "[Feature:NetworkPolicy]",
    "[sig-network] Netpol NetworkPolicy between server and client should enforce except clause while egress access "
    "to server in CIDR block [Feature:NetworkPolicy]",
    "[sig-network] Netpol NetworkPolicy between server and client should ensure an IP overlapping both IPBlock.CIDR "
    "and IPBlock.Except is allowed [Feature:NetworkPolicy]",
]
SERVICES_RUN = [
    "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
    "[sig-network] Services should be able to create a functioning NodePort service [Conformance]",
    "[sig-network] EndpointSliceMirroring should mirror a custom Endpoints resource through create update and "
    "delete [Conformance]",
    "[sig-network] Networking Granular Checks: Services should function for pod-Service: udp",
    "[sig-network] Proxy version v1 should proxy through a service and a pod [Conformance]",
]
SERVICES_LEFT_OUT = [
    "[sig-network] Services should work after restarting kube-proxy [Disruptive]",
    "[sig-network] Networking Granular Checks: Services should function for pod-Service: sctp "
    "[Feature:SCTPConnectivity]",
    "[sig-network] Networking should provide Internet connection for containers [Feature:Networking-IPv4]",
    "[sig-network] LoadBalancers [Feature:LoadBalancer] should be able to change the type and ports of a TCP "
    "service [Slow]",
    "[sig-network] DNS should provide /etc/hosts entries for the cluster [Conformance]",
    "[sig-network] HostPort validates that there is no conflict between pods with same hostPort but different "
    "hostIP and protocol [LinuxOnly] [Conformance]",
    "[sig-network] [Feature:IPv6DualStack] should create service with ipv6 cluster ip",
    "[sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy "
    "[Feature:NetworkPolicy]",
]
DNS_RUN = [
    "[sig-network] DNS should provide DNS for services [Conformance]",
    "[sig-network] DNS HostNetwork spec.Hostname field is silently ignored and the node hostname is used when "
    "hostNetwork is set to true for a Pod",
]
DNS_LEFT_OUT = [
    "[sig-network] DNS configMap nameserver Change stubDomain should be able to change stubDomain configuration "
    "[Slow] [Serial]",
    "[sig-network] DNS should provide DNS for the cluster [Provider:GCE]",
    "[sig-network] DNS should work with a service name that starts with a digit "
    "[FeatureGate:RelaxedServiceNameValidation] [Alpha] [Feature:OffByDefault]",
    "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
]


@pytest.mark.parametrize("path", LISTS, ids=lambda p: p.name)
def test_every_skip_says_why(path: Path) -> None:
    text = path.read_text()
    assert conformance.parse_focus(text).focus
    assert conformance.uncommented_skips(text) == []


def test_uncommented_skips_finds_a_bare_skip() -> None:
    assert conformance.uncommented_skips("a\n# why\n!b\n!c\n\n!d\n!e  # why\n") == ["!d"]


@pytest.mark.parametrize(("name", "run", "left_out"), [
    ("netpol", NETPOL_RUN, NETPOL_LEFT_OUT), ("services", SERVICES_RUN, SERVICES_LEFT_OUT),
    ("dns", DNS_RUN, DNS_LEFT_OUT)])
def test_area_selects_what_it_says(name: str, run: list[str], left_out: list[str]) -> None:
    focus = conformance.parse_focus((ROOT / "e2e" / "conformance" / f"{name}.txt").read_text())
    assert conformance.selected(run + left_out, focus) == run
    assert conformance.area_name(ROOT / "e2e" / "conformance" / f"{name}.txt") == name


def test_area_result_line() -> None:
    result = conformance.AreaResult("netpol", passed=40, failed=3, skipped=1, seconds=1800.4, failures=("x",))
    assert result.run == 44
    assert result.line() == "conformance netpol: 44 specs run, 40 passed, 3 failed, 1 skipped (1800 s)"


def test_shards_split_the_selected_specs_into_exact_name_regexes() -> None:
    names = NETPOL_RUN + SERVICES_RUN
    parts = conformance.shard_focus(names, 3)
    assert len(parts) == 3
    chosen = [conformance.selected(names, part) for part in parts]
    assert sorted(sum(chosen, [])) == sorted(names)  # every spec in exactly one shard
    assert all(len(c) in (3, 2) for c in chosen)
    assert conformance.shard_focus(names[:1], 3) == [conformance.FocusList((conformance.go_regex_literal(names[0]),),
                                                                          ())]


def test_go_regex_literal_escapes_only_regex_syntax() -> None:
    assert conformance.go_regex_literal("a [b] (c). 'd': e|f") == r"a \[b\] \(c\)\. 'd': e\|f"


def test_area_result_line_names_interrupted_specs() -> None:
    result = conformance.AreaResult("services", 30, 5, 1, 600.0, (), interrupted=1)
    assert result.run == 37
    assert result.line() == "conformance services: 37 specs run, 30 passed, 5 failed, 1 skipped, 1 interrupted (600 s)"


def test_verdicts_name_each_counted_spec_and_topics_group_them_by_area() -> None:
    junit = ("<testsuites><testsuite><testcase name='[SynchronizedBeforeSuite]'/>"
             "<testcase name='[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]'/>"
             "<testcase name='[It] [sig-network] Netpol NetworkPolicy between server and client should support a "
             "&apos;default-deny-ingress&apos; policy [Feature:NetworkPolicy]'><failure/></testcase>"
             "<testcase name='[It] [sig-network] DNS should provide DNS for services'><skipped message='skipped - "
             "no jessie'/></testcase>"
             "<testcase name='[It] [sig-network] Networking Granular Checks: Pods x'><error type='interrupted'/>"
             "</testcase><testcase name='[It] [sig-network] DNS y'><skipped message='skipped'/></testcase>"
             "<testcase name='[It] [sig-apps] Deployment z'/></testsuite></testsuites>")
    found = conformance.verdicts(junit)
    assert [v for _, v in found] == ["passed", "failed", "skipped", "interrupted", "passed"]
    assert conformance.summarize(junit) == {"passed": 2, "failed": 1, "skipped": 1, "interrupted": 1}
    assert [conformance.topic(n) for n, _ in found] == ["Services", "Netpol", "DNS", "Networking", "[sig-apps]"]
    assert conformance.topic("no sig at all") == "other"
    result = conformance.AreaResult("short", 2, 1, 1, 60.0, (), 1, tuple(found))
    assert result.topic_lines() == ["  Services: 1 run, 1 passed, 0 failed, 0 skipped",
                                    "  Netpol: 1 run, 0 passed, 1 failed, 0 skipped",
                                    "  DNS: 1 run, 0 passed, 0 failed, 1 skipped",
                                    "  Networking: 1 run, 0 passed, 0 failed, 0 skipped, 1 interrupted",
                                    "  [sig-apps]: 1 run, 1 passed, 0 failed, 0 skipped"]


def test_the_short_list_selects_one_spec_of_every_area_and_no_variant() -> None:
    focus = conformance.parse_focus((ROOT / "e2e" / "conformance.txt").read_text())
    chosen = conformance.selected(NETPOL_RUN + NETPOL_LEFT_OUT + SERVICES_RUN + DNS_RUN, focus)
    assert {conformance.topic(n) for n in chosen} == {"Services", "Netpol", "DNS"}
    assert not any("UDP" in n or "SCTP" in n or "Netpol API" in n for n in chosen), chosen
