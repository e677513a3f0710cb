"""Egress TLS interception in the operator: TLS contexts on the HTTP rules, Secrets into the intents of the
nodes that need them (``policy.tls_secrets``), failing closed, never printed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_policy_resolution import WEB, ccnp, cnp, state_of  # type: ignore[import-not-found]

from ciliary.lab.testca import TestCA
from ciliary.operator import intents
from ciliary.operator.policy import tls_secrets
from ciliary.operator.policy.resolution import resolve_cluster

CA = TestCA("interception-ca")
CERT, KEY = CA.issue("api.world.test")
WORLD_CA = TestCA("world-ca")
INTERCEPT = {"tls.crt": CERT.encode(), "tls.key": KEY.encode()}
TRUST = {"ca.crt": WORLD_CA.cert_pem.encode()}


def port_rule(**extra: Any) -> dict[str, Any]:
    return {"ports": [{"port": "443", "protocol": "TCP"}], "rules": {"http": [{"method": "GET", "path": "/public"}]},
            **extra}


def egress(rule: dict[str, Any]) -> dict[str, Any]:
    return {"endpointSelector": WEB, "egress": [{"toCIDR": ["192.0.2.100/32"], "toPorts": [rule]}]}


BOTH = {"terminatingTLS": {"secret": {"name": "intercept"}}, "originatingTLS": {"secret": {"name": "world-ca"}}}
ELSEWHERE = {**BOTH, "originatingTLS": {"secret": {"namespace": "kube-system", "name": "world-ca"}}}
"""As Cilium's guide writes it: the CA bundle in kube-system (a cluster-wide policy may; a namespaced may not)."""


def entry_443(intent: intents.NodeIntent, pod: str = "web", namespace: str = "a") -> intents.PolicyEntry:
    ep = next(e for e in intent.endpoints if e.pod == pod and e.namespace == namespace)
    return next(e for e in ep.egress.entries if e.port_low == 443)


def test_both_contexts_ride_on_the_http_rules_other_shapes_fail_closed() -> None:
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(serverNames=["API.world.test."], **BOTH)))))
    entry = entry_443(resolved["n1"])
    assert entry.l7_redirect and entry.http is not None
    tls = entry.http[0].tls
    assert tls is not None and tls.server_names == ("api.world.test",)
    # a CNP's Secret without a namespace is in the policy's namespace
    assert (tls.terminating.namespace, tls.terminating.name) == ("a", "intercept")
    # one context alone, or serverNames alone: not interceptable, the port fails closed (no HTTP rules)
    for partial in ({"terminatingTLS": BOTH["terminatingTLS"]}, {"originatingTLS": BOTH["originatingTLS"]},
                    {"serverNames": ["api.world.test"]}):
        entry = entry_443(resolve_cluster(state_of(cnp(egress(port_rule(**partial)))))["n1"])
        assert entry.l7_redirect and entry.http is None, partial
    assert tls.originating is not None and (tls.originating.namespace, tls.originating.name) == ("a", "world-ca")


def ingress_443(rule: dict[str, Any]) -> list[intents.PolicyEntry]:
    ingress = cnp({"endpointSelector": WEB, "ingress": [{"fromEndpoints": [{}], "toPorts": [rule]}]})
    web = next(e for e in resolve_cluster(state_of(ingress))["n1"].endpoints if e.pod == "web")
    return [e for e in web.ingress.entries if e.port_low == 443]


def test_ingress_terminates_with_or_without_originating_and_fails_closed_without_terminating() -> None:
    for contexts, originating in ((BOTH, "world-ca"), ({"terminatingTLS": BOTH["terminatingTLS"]}, None)):
        found = ingress_443(port_rule(serverNames=["web.a.test"], **contexts))
        assert found and all(e.l7_redirect and e.http for e in found)
        tls = found[0].http[0].tls  # type: ignore[index]
        assert tls is not None and tls.terminating.name == "intercept" and tls.server_names == ("web.a.test",)
        assert (tls.originating.name if tls.originating else None) == originating
    for partial in ({"originatingTLS": BOTH["originatingTLS"]}, {"serverNames": ["web.a.test"]}):
        found = ingress_443(port_rule(**partial))
        assert found and {(e.l7_redirect, e.http) for e in found} == {(True, None)}, partial


def test_secrets_go_only_to_nodes_hosting_selected_pods_and_rotation_changes_the_intent() -> None:
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(**BOTH)))))  # selects a/web on n1 only
    secrets = {("a", "intercept"): INTERCEPT, ("a", "world-ca"): TRUST}
    assert tls_secrets.references(resolved.values()) == set(secrets)
    n1, problems = tls_secrets.attach(resolved["n1"], secrets)
    n2, _ = tls_secrets.attach(resolved["n2"], secrets)
    assert problems == [] and n2.tls_secrets == {}
    assert set(n1.tls_secrets) == {"a/intercept", "a/world-ca"}
    assert n1.tls_secrets["a/intercept"].private_key == KEY
    assert n1.tls_secrets["a/world-ca"].trusted_ca == WORLD_CA.cert_pem
    # rotation: new items, new content hash (published again)
    cert2, key2 = CA.issue("api.world.test")
    rotated, _ = tls_secrets.attach(resolved["n1"], {**secrets, ("a", "intercept"): {
        "tls.crt": cert2.encode(), "tls.key": key2.encode()}})
    assert rotated.content_hash() != n1.content_hash()
    # the wire form carries the key (the node needs it); repr and the CLI's dump never do
    assert json.loads(n1.to_wire())["tls_secrets"]["a/intercept"]["private_key"] == KEY
    assert "BEGIN" not in repr(n1) and "BEGIN" not in repr(n1.tls_secrets["a/intercept"])
    dumped = str(n1.public_dump())
    assert "BEGIN" not in dumped and "sha256" in dumped


def test_a_ccnp_secret_namespace_is_each_endpoints() -> None:
    policy = ccnp(egress(port_rule(**ELSEWHERE)))
    resolved = resolve_cluster(state_of(policy))  # a/web on n1, b/web on n2
    assert tls_secrets.references([tls_secrets.fill_namespaces(resolved["n1"])]) == {
        ("a", "intercept"), ("kube-system", "world-ca")}
    assert tls_secrets.references([tls_secrets.fill_namespaces(resolved["n2"])]) == {
        ("b", "intercept"), ("kube-system", "world-ca")}


def test_a_cnp_naming_another_namespaces_secret_is_not_proxied_and_reads_none() -> None:
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(**ELSEWHERE)))))
    entry = entry_443(resolved["n1"])
    assert entry.l7_redirect and entry.http is None  # dropped (PROXY_UNAVAILABLE); support row foreign-secret
    assert tls_secrets.references([tls_secrets.fill_namespaces(resolved["n1"])]) == set()


@pytest.mark.parametrize(("secrets", "needle"), [
    ({("a", "world-ca"): TRUST}, "terminatingTLS Secret a/intercept: not found"),
    ({("a", "intercept"): {"tls.crt": CERT.encode()}, ("a", "world-ca"): TRUST},
     "a certificate needs its private key"),
    ({("a", "intercept"): {"tls.crt": CERT.encode(), "tls.key": CA.issue("x")[1].encode()},
      ("a", "world-ca"): TRUST}, "the private key does not match the certificate"),
    ({("a", "intercept"): INTERCEPT, ("a", "world-ca"): {"ca-certificates.crt": TRUST["ca.crt"]}},
     "originatingTLS Secret a/world-ca: TLS certificates not found in the Secret"),
    ({("a", "intercept"): INTERCEPT, ("a", "world-ca"): {"ca.crt": b"not pem"}}, "not PEM text"),
])
def test_a_missing_or_bad_secret_fails_closed_naming_it_never_its_content(
        secrets: dict[tuple[str, str], dict[str, bytes]], needle: str) -> None:
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(**BOTH)))))
    attached, problems = tls_secrets.attach(resolved["n1"], secrets)
    entry = entry_443(attached)
    assert entry.l7_redirect and entry.http is None  # the node drops the connections (PROXY_UNAVAILABLE)
    assert attached.tls_secrets == {}
    assert [p.policy_uid for p in problems] == ["uid-a-p"]
    assert needle in problems[0].message and "BEGIN" not in problems[0].message


def test_a_named_item_must_exist_and_is_used() -> None:
    named = {"terminatingTLS": {"secret": {"name": "intercept"}, "certificate": "c.pem", "privateKey": "k.pem"},
             "originatingTLS": {"secret": {"name": "world-ca"}, "trustedCA": "bundle"}}
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(**named)))))
    ok = {("a", "intercept"): {"c.pem": CERT.encode(), "k.pem": KEY.encode()},
          ("a", "world-ca"): {"bundle": WORLD_CA.cert_pem.encode()}}
    attached, problems = tls_secrets.attach(resolved["n1"], ok)
    assert problems == [] and entry_443(attached).http is not None
    assert attached.tls_secrets["a/world-ca?bundle,,"].trusted_ca == WORLD_CA.cert_pem
    _, problems = tls_secrets.attach(resolved["n1"], {**ok, ("a", "world-ca"): TRUST})
    assert "trusted CA item 'bundle' not found" in problems[0].message


def test_tls_and_plain_http_rules_on_one_entry_conflict() -> None:
    both = cnp({"endpointSelector": WEB, "egress": [
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [port_rule(**BOTH)]},
        {"toCIDR": ["192.0.2.100/32"], "toPorts": [port_rule()]}]})
    resolved = resolve_cluster(state_of(both))
    attached, problems = tls_secrets.attach(resolved["n1"], {("a", "intercept"): INTERCEPT,
                                                            ("a", "world-ca"): TRUST})
    assert entry_443(attached).http is None and "conflicting TLS contexts" in problems[0].message


def test_a_malformed_intent_is_refused_without_quoting_its_values() -> None:
    resolved = resolve_cluster(state_of(cnp(egress(port_rule(**BOTH)))))
    attached, _ = tls_secrets.attach(resolved["n1"], {("a", "intercept"): INTERCEPT,
                                                     ("a", "world-ca"): TRUST})
    data = json.loads(attached.to_wire())
    data["tls_secrets"]["a/intercept"]["private_key"] = [KEY]  # wrong type: the value must not be echoed
    with pytest.raises(intents.IntentSchemaError) as refused:
        intents.parse_node_intent("n1", json.dumps(data))
    assert "tls_secrets" in str(refused.value) and "BEGIN" not in str(refused.value)


def test_ingress_contexts_are_read_and_fail_closed_like_egress() -> None:
    ingress = cnp({"endpointSelector": WEB, "ingress": [{"fromEndpoints": [{}], "toPorts": [
        port_rule(terminatingTLS={"secret": {"name": "intercept"}})]}]})
    resolved = resolve_cluster(state_of(ingress))
    assert tls_secrets.references(resolved.values()) == {("a", "intercept")}
    n1, problems = tls_secrets.attach(resolved["n1"], {("a", "intercept"): INTERCEPT})
    assert problems == [] and set(n1.tls_secrets) == {"a/intercept"}
    failed, problems = tls_secrets.attach(resolved["n1"], {})
    web = next(e for e in failed.endpoints if e.pod == "web")
    assert {(e.l7_redirect, e.http) for e in web.ingress.entries if e.port_low == 443} == {(True, None)}
    assert failed.tls_secrets == {} and [p.message for p in problems] == [
        "terminatingTLS Secret a/intercept: not found"]
