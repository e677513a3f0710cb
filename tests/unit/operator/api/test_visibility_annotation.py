"""The proxy-visibility annotation parser: grammar, refusals, keys (examples and properties)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliary.operator.api.visibility import (
    KEY,
    LEGACY_KEY,
    VisibilityError,
    VisibilityTuple,
    parse_visibility,
    pod_visibility,
)


def test_the_documented_example_parses_to_its_ports() -> None:
    assert parse_visibility("<Ingress/80/TCP/HTTP>,<Egress/53/UDP/DNS>") == (
        VisibilityTuple("egress", 53, "UDP", "dns"), VisibilityTuple("ingress", 80, "TCP", "http"))


def test_any_expands_per_parser_and_l7_names_are_case_blind() -> None:
    assert parse_visibility("<Ingress/8080/ANY/http>") == (VisibilityTuple("ingress", 8080, "TCP", "http"),)
    assert parse_visibility(" <Egress/53/ANY/Dns> , <Egress/53/ANY/DNS>") == (
        VisibilityTuple("egress", 53, "TCP", "dns"), VisibilityTuple("egress", 53, "UDP", "dns"))
    assert parse_visibility("<Ingress/1/TCP/HTTP>,<Ingress/65535/TCP/HTTP>") == (
        VisibilityTuple("ingress", 1, "TCP", "http"), VisibilityTuple("ingress", 65535, "TCP", "http"))


@pytest.mark.parametrize(("value", "problem"), [
    ("", "empty"),
    ("<Ingress/80/TCP/HTTP>,", "tuple 2 ''"),
    ("<ingress/80/TCP/HTTP>", "is not <Ingress|Egress"),
    ("<Ingress/80/tcp/HTTP>", "is not <Ingress|Egress"),
    ("<Ingress/80/SCTP/HTTP>", "is not <Ingress|Egress"),
    ("Ingress/80/TCP/HTTP", "is not <Ingress|Egress"),
    ("<Ingress/0/TCP/HTTP>", "port 0 is not in 1-65535"),
    ("<Ingress/70000/TCP/HTTP>", "port 70000 is not in 1-65535"),
    ("<Ingress/80/UDP/HTTP>", "HTTP runs on TCP"),
    ("<Ingress/53/UDP/DNS>", "DNS visibility is egress only"),
    ("<Ingress/9092/TCP/Kafka>", "Kafka visibility is not built"),
    ("<Ingress/80/TCP/HTTP>,<Egress/9092/TCP/kafka>", "Kafka visibility is not built"),
    ("<Ingress/80/TCP/GRPC>", "unsupported L7 protocol 'GRPC'"),
    ("<Egress/53/TCP/HTTP>,<Egress/53/ANY/DNS>", "two L7 protocols"),
])
def test_refused_values_name_their_problem(value: str, problem: str) -> None:
    with pytest.raises(VisibilityError) as caught:
        parse_visibility(value)
    assert problem in caught.value.problem
    assert caught.value.value == value


TUPLES = st.builds(VisibilityTuple, st.sampled_from(["ingress", "egress"]), st.integers(1, 65535),
                   st.sampled_from(["TCP"]), st.just("http")) | st.builds(
    VisibilityTuple, st.just("egress"), st.integers(1, 65535), st.sampled_from(["TCP", "UDP"]), st.just("dns"))


def _write(t: VisibilityTuple) -> str:
    return f"<{t.direction.capitalize()}/{t.port}/{t.protocol}/{t.parser.upper()}>"


@given(st.lists(TUPLES, min_size=1, max_size=6))
def test_written_tuples_parse_back_or_are_refused_only_for_a_port_with_two_parsers(items: list[VisibilityTuple]
                                                                                   ) -> None:
    value = ",".join(_write(t) for t in items)
    clash = len({(t.direction, t.port, t.protocol) for t in items}) != len(set(items))
    if clash:
        with pytest.raises(VisibilityError, match="two L7 protocols"):
            parse_visibility(value)
    else:
        assert parse_visibility(value) == tuple(sorted(set(items)))


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_the_typed_error(value: str) -> None:
    try:
        found = parse_visibility(value)
    except VisibilityError as exc:
        assert exc.problem
    else:
        assert found and all(1 <= t.port <= 65535 for t in found)
        assert all(t.parser == "http" and t.protocol == "TCP" or t.parser == "dns" and t.direction == "egress"
                   for t in found)


def test_the_newer_key_wins_and_the_older_is_named_ignored() -> None:
    assert pod_visibility(None).key == "" and pod_visibility({"other": "x"}).tuples == ()
    legacy = pod_visibility({LEGACY_KEY: "<Ingress/80/TCP/HTTP>"})
    assert (legacy.key, legacy.ignored, legacy.describe()) == (LEGACY_KEY, "", "ingress TCP/80 HTTP")
    both = pod_visibility({LEGACY_KEY: "<Ingress/80/TCP/HTTP>", KEY: "<Egress/53/UDP/DNS>"})
    assert (both.key, both.ignored) == (KEY, LEGACY_KEY)
    assert both.tuples == (VisibilityTuple("egress", 53, "UDP", "dns"),)
    # a bad newer value is refused whole: the older key is not read in its place
    bad = pod_visibility({LEGACY_KEY: "<Ingress/80/TCP/HTTP>", KEY: "<Ingress/80/TCP/Kafka>"})
    assert bad.tuples == () and bad.ignored == LEGACY_KEY
    assert bad.problem.startswith(f"{KEY}: ") and "Kafka" in bad.problem
