"""The L7 visibility pod annotation: its keys, its grammar and its parser (pure).

Owns :func:`parse_visibility` (one annotation value to :class:`VisibilityTuple` values),
:func:`pod_visibility` (a pod's annotations to a :class:`PodVisibility`: which key was read, what it
asks for, what is wrong with it) and :class:`VisibilityError`.

Grammar (as Cilium's annotation, with the deviations below): a comma-separated list of tuples
``<Direction/Port/L4/L7>``, e.g. ``<Ingress/80/TCP/HTTP>,<Egress/53/UDP/DNS>``:

- Direction ``Ingress`` or ``Egress``; L4 ``TCP``, ``UDP`` or ``ANY`` (all three as written, case
  included); the L7 name is read case-blind;
- port a decimal number 1-65535 (Cilium's pattern wants two digits at least; Ciliary takes 1-9 too);
- ``HTTP`` runs on TCP: ``TCP`` and ``ANY`` give the TCP port, ``UDP`` is refused;
- ``DNS`` on ``Egress`` only (the node's DNS proxy serves the pods' queries); ``UDP``/``TCP`` give that
  protocol, ``ANY`` both;
- ``Kafka`` (Cilium parses it) is refused: Ciliary has no Kafka proxy; any other L7 name is refused;
- one port, protocol and direction with two L7 names is refused; a repeated tuple counts once;
- blanks around a tuple are ignored; an empty value is refused.

A value with any problem is refused whole (:class:`VisibilityError`): nothing of it applies.

Keys: ``policy.cilium.io/proxy-visibility`` and Cilium 1.7's ``io.cilium.proxy-visibility``. When a
pod carries both, the newer key is read and the older one is ignored (:attr:`PodVisibility.ignored`
names it, the operator says so in a Warning Event).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

KEY = "policy.cilium.io/proxy-visibility"
LEGACY_KEY = "io.cilium.proxy-visibility"

Parser = Literal["http", "dns"]
_TUPLE = re.compile(r"<(Ingress|Egress)/([0-9]{1,5})/(TCP|UDP|ANY)/([A-Za-z0-9_-]{1,32})>")


class VisibilityError(ValueError):
    """An annotation value that cannot be applied; ``value`` is the annotation, ``problem`` what is wrong."""

    def __init__(self, value: str, problem: str) -> None:
        super().__init__(f"proxy-visibility {value!r}: {problem}")
        self.value = value
        self.problem = problem


@dataclass(frozen=True, slots=True, order=True)
class VisibilityTuple:
    """One port of one direction whose traffic goes through the node's proxy for ``parser``, to be seen."""

    direction: Literal["ingress", "egress"]
    port: int
    protocol: Literal["TCP", "UDP"]
    parser: Parser

    def describe(self) -> str:
        return f"{self.direction} {self.protocol}/{self.port} {self.parser.upper()}"


def parse_visibility(value: str) -> tuple[VisibilityTuple, ...]:
    """Every (direction, port, protocol, parser) ``value`` asks for, sorted; raises :class:`VisibilityError`."""
    if not value.strip():
        raise VisibilityError(value, "empty; expected <Ingress|Egress/port/TCP|UDP|ANY/HTTP|DNS>, comma-separated")
    found: dict[tuple[str, int, str], VisibilityTuple] = {}
    for index, raw in enumerate(value.split(",")):
        text = raw.strip()
        match = _TUPLE.fullmatch(text)
        if match is None:
            raise VisibilityError(value, f"tuple {index + 1} {text!r} is not "
                                         f"<Ingress|Egress/port/TCP|UDP|ANY/HTTP|DNS>")
        direction_name, port_text, l4, l7_name = match.groups()
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise VisibilityError(value, f"tuple {index + 1} {text!r}: port {port} is not in 1-65535")
        direction: Literal["ingress", "egress"] = "ingress" if direction_name == "Ingress" else "egress"
        for item in _expand(value, index, text, direction, port, l4, l7_name.lower()):
            key = (item.direction, item.port, item.protocol)
            other = found.get(key)
            if other is not None and other.parser != item.parser:
                raise VisibilityError(value, f"{direction_name} {item.protocol}/{port} is given two L7 protocols "
                                             f"({other.parser.upper()} and {item.parser.upper()})")
            found[key] = item
    return tuple(sorted(found.values()))


def _expand(value: str, index: int, text: str, direction: Literal["ingress", "egress"], port: int, l4: str,
            l7: str) -> tuple[VisibilityTuple, ...]:
    where = f"tuple {index + 1} {text!r}"
    if l7 == "http":
        if l4 == "UDP":
            raise VisibilityError(value, f"{where}: HTTP runs on TCP, not UDP")
        return (VisibilityTuple(direction, port, "TCP", "http"),)
    if l7 == "dns":
        if direction == "ingress":
            raise VisibilityError(value, f"{where}: DNS visibility is egress only (the node's DNS proxy sees "
                                         f"the pod's own queries)")
        protocols: tuple[Literal["TCP", "UDP"], ...] = ("TCP", "UDP") if l4 == "ANY" else (
            ("TCP",) if l4 == "TCP" else ("UDP",))
        return tuple(VisibilityTuple(direction, port, p, "dns") for p in protocols)
    if l7 == "kafka":
        raise VisibilityError(value, f"{where}: Kafka visibility is not built (Ciliary has no Kafka proxy)")
    raise VisibilityError(value, f"{where}: unsupported L7 protocol {l7.upper()!r} (HTTP or DNS)")


@dataclass(frozen=True, slots=True)
class PodVisibility:
    """What a pod's annotations ask for: ``tuples`` to apply (empty when ``problem`` is set)."""

    key: str = ""
    """The annotation key read ("" when the pod carries neither)."""
    value: str = ""
    tuples: tuple[VisibilityTuple, ...] = ()
    problem: str = ""
    """Why the annotation is refused whole ("" when it is applied, or absent)."""
    ignored: str = ""
    """The older key, when both keys are present (its value is not read)."""

    def describe(self) -> str:
        """The tuples in force, for people ("" when none)."""
        return ", ".join(t.describe() for t in self.tuples)


def pod_visibility(annotations: Mapping[str, str] | None) -> PodVisibility:
    """The visibility a pod's annotations ask for (never raises: a bad value gives ``problem``)."""
    annotations = annotations or {}
    if KEY in annotations:
        key, ignored = KEY, LEGACY_KEY if LEGACY_KEY in annotations else ""
    elif LEGACY_KEY in annotations:
        key, ignored = LEGACY_KEY, ""
    else:
        return PodVisibility()
    value = str(annotations[key])
    try:
        tuples = parse_visibility(value)
    except VisibilityError as exc:
        return PodVisibility(key=key, value=value, problem=f"{key}: {exc.problem}", ignored=ignored)
    return PodVisibility(key=key, value=value, tuples=tuples, ignored=ignored)
