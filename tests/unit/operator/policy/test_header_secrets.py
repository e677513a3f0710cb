"""headerMatches values from Secrets, on the operator side (pure): which Secrets a node's intent names, the
value rules, the intents of nodes hosting selected pods only, fallback to the inline value, fail closed."""

from __future__ import annotations

from typing import Any

import pytest
from test_policy_resolution import DB, WEB, ccnp, cnp, state_of  # type: ignore[import-not-found]

from ciliary.operator import intents
from ciliary.operator.policy import header_secrets
from ciliary.operator.policy.resolution import resolve_cluster

PORT80 = {"ports": [{"port": "80", "protocol": "TCP"}]}


def ingress_db(*matches: dict[str, Any]) -> dict[str, Any]:
    """a/db (node n2) admits a/web on 80 only for /private with the given header matches."""
    return cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [
        {**PORT80, "rules": {"http": [{"path": "/private", "headerMatches": list(matches)}]}}]}]})


def port80(intent: intents.NodeIntent, pod: str, direction: str = "ingress") -> intents.PolicyEntry:
    endpoint = next(e for e in intent.endpoints if f"{e.namespace}/{e.pod}" == pod)
    return next(e for e in getattr(endpoint, direction).entries if e.port_low == 80)


TOKEN = {("a", "tok"): {"token": b"s3cret-v1"}}


def test_the_secret_value_goes_only_into_the_intents_of_nodes_hosting_selected_pods() -> None:
    resolved = resolve_cluster(state_of(ingress_db({"name": "Access-Token", "secret": {"name": "tok"}})))
    assert header_secrets.references(resolved.values()) == {("a", "tok")}
    assert not header_secrets.names_secrets(resolved["n1"])  # a/db runs on n2 only
    out, problems = header_secrets.attach(resolved["n2"], TOKEN)
    assert problems == [] and {k: v.value for k, v in out.header_secrets.items()} == {"a/tok": "s3cret-v1"}
    match = port80(out, "a/db").http[0].header_matches[0]  # type: ignore[index]
    assert match.secret == intents.SecretRef(namespace="a", name="tok") and match.value == ""
    plain, none = header_secrets.attach(resolved["n1"], TOKEN)
    assert plain.header_secrets == {} and none == []
    # never printed: repr and `policy get --intent` show no value
    assert "s3cret" not in repr(out) and "s3cret" not in str(out.public_dump())
    assert out.public_dump()["header_secrets"] == {"a/tok": "<hidden, 9 bytes>"}
    # rotation: another value, another intent content
    rotated, _ = header_secrets.attach(resolved["n2"], {("a", "tok"): {"token": b"s3cret-v2"}})
    assert rotated.content_hash() != out.content_hash()


def test_a_missing_secret_without_inline_value_fails_closed_and_names_the_secret() -> None:
    for match in ({"name": "X-Team", "secret": {"name": "absent"}},
                  {"name": "X-Team", "secret": {"name": "absent"}, "mismatch": "REPLACE"}):
        resolved = resolve_cluster(state_of(ingress_db(match)))
        out, problems = header_secrets.attach(resolved["n2"], {})
        entry = port80(out, "a/db")
        assert entry.l7_redirect and entry.l7_parser == "http" and entry.http is None  # PROXY_UNAVAILABLE
        assert out.header_secrets == {}
        assert [(p.policy_uid, p.message) for p in problems] == [(
            "uid-a-p", "headerMatches Secret a/absent: not found: the port's connections are dropped")]


def test_a_missing_secret_with_inline_value_falls_back_to_it_and_says_so() -> None:
    resolved = resolve_cluster(state_of(ingress_db(
        {"name": "X-Team", "value": "blue", "secret": {"name": "absent"}, "mismatch": "LOG"})))
    out, problems = header_secrets.attach(resolved["n2"], {})
    http = port80(out, "a/db").http
    assert http is not None and http[0].header_matches == (
        intents.HeaderMatch(name="X-Team", value="blue", mismatch="LOG"),)
    assert [p.message for p in problems] == [
        "headerMatches Secret a/absent: not found: its inline value is matched instead"]


@pytest.mark.parametrize(("data", "why"), [
    ({}, "must have exactly one item (it has 0)"),
    ({"a": b"1", "b": b"2"}, "must have exactly one item (it has 2)"),
    ({"token": b"s3cret\n"}, "item 'token' is not an HTTP header value"),
    ({"token": b" s3cret"}, "item 'token' is not an HTTP header value"),
    ({"token": b"\xff\xfe"}, "item 'token' is not UTF-8 text"),
    ({"token": b""}, "item 'token' is empty"),  # review: a placeholder must not become a presence match
])
def test_a_secret_that_gives_no_header_value_is_refused(data: dict[str, bytes], why: str) -> None:
    ref = intents.SecretRef(namespace="a", name="tok")
    with pytest.raises(header_secrets.HeaderSecretError) as refused:
        header_secrets.value(ref, data)
    assert str(refused.value).startswith(f"headerMatches Secret a/tok: {why}")
    assert "s3cret" not in str(refused.value)


def test_values_cilium_allows() -> None:
    ref = intents.SecretRef(namespace="a", name="tok")
    assert header_secrets.value(ref, {"x": "Bearer a\tb é".encode()}) == "Bearer a\tb é"


def test_a_ccnp_secret_namespace_is_the_selected_pods() -> None:
    policy = ccnp({"endpointSelector": WEB, "egress": [{"toEndpoints": [DB], "toPorts": [{**PORT80, "rules": {
        "http": [{"headerMatches": [{"name": "X-Token", "secret": {"name": "tok"}, "mismatch": "REPLACE"}]}]}}]}]})
    resolved = resolve_cluster(state_of(policy))
    # a/web runs on n1, b/web on n2: each node's intent names its own pod's namespace
    assert header_secrets.references([header_secrets.fill_namespaces(resolved["n1"])]) == {("a", "tok")}
    assert header_secrets.references([header_secrets.fill_namespaces(resolved["n2"])]) == {("b", "tok")}
    out, problems = header_secrets.attach(resolved["n2"], {("b", "tok"): {"t": b"bee"}, ("a", "tok"): {"t": b"a"}})
    assert problems == [] and {k: v.value for k, v in out.header_secrets.items()} == {"b/tok": "bee"}


def test_an_agent_reading_an_intent_gets_the_value_back() -> None:
    resolved = resolve_cluster(state_of(ingress_db({"name": "Access-Token", "secret": {"name": "tok"}})))
    out, _ = header_secrets.attach(resolved["n2"], TOKEN)
    again = intents.parse_node_intent("n2", out.to_wire())
    assert again == out and again.header_secrets["a/tok"].value == "s3cret-v1"


def test_a_cnp_naming_another_namespaces_secret_is_not_proxied_and_reads_nothing() -> None:
    """Review finding: a CNP in namespace a naming kube-system's Secret would get its value written into its own
    pod's requests (REPLACE) — a namespaced policy may only use Secrets of its own namespace."""
    policy = ingress_db({"name": "X-Token", "secret": {"namespace": "kube-system", "name": "tok"},
                         "mismatch": "REPLACE"})
    resolved = resolve_cluster(state_of(policy))
    assert header_secrets.references(resolved.values()) == set()  # never read
    entry = port80(resolved["n2"], "a/db")
    assert entry.l7_redirect and entry.http is None  # dropped (PROXY_UNAVAILABLE), support says why
    own = ingress_db({"name": "X-Token", "secret": {"namespace": "a", "name": "tok"}})
    assert header_secrets.references(resolve_cluster(state_of(own)).values()) == {("a", "tok")}
