"""Label sets, label selectors and their namespace scoping.

Owns what a selector of the policy language *means*:

- a selector key may carry a source prefix (``k8s:app``, ``reserved:host``,
  ``cidr:10.0.0.0/8``); a key without one (``app``) is ``any:app`` and matches a
  label of that key from any source. Only the first ``:`` separates the source;
- ``matchLabels`` are ``In`` requirements with one value; ``matchExpressions``
  support ``In``, ``NotIn``, ``Exists`` and ``DoesNotExist`` with Kubernetes
  semantics (``NotIn`` and ``DoesNotExist`` hold when the key is absent);
- namespace scoping (:func:`scope_subject`, :func:`scope_peer`): in a CNP the
  ``endpointSelector`` always gets the policy's namespace, peer selectors get it
  unless they name a namespace, use namespace labels, or select reserved labels;
  in a CCNP subjects are unscoped and peer selectors without a namespace key get
  ``k8s:io.kubernetes.pod.namespace Exists`` (so ``[{}]`` is every pod, never world).

:class:`SelectionIndex` matches many selectors against many label sets quickly
(posting lists on ``(key, value)``); ``resolution`` uses it as its selector cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ciliary.operator.api.selectors import LabelSelector

ANY_SOURCE = "any"
K8S_SOURCE = "k8s"
RESERVED_SOURCE = "reserved"
CIDR_SOURCE = "cidr"

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_KEY = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_KEY = "io.cilium.k8s.policy.cluster"

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One security-relevant label: ``source:key=value``."""

    source: str
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"


class LabelSet:
    """An immutable, canonically ordered set of :class:`Label` with a per-key index."""

    __slots__ = ("_by_key", "_hash", "_strings", "labels")

    def __init__(self, labels: Iterable[Label]) -> None:
        self.labels: tuple[Label, ...] = tuple(sorted(set(labels)))
        by_key: dict[str, list[tuple[str, str]]] = {}
        for label in self.labels:
            by_key.setdefault(label.key, []).append((label.source, label.value))
        self._by_key = {k: tuple(v) for k, v in by_key.items()}
        self._hash = hash(self.labels)
        self._strings: tuple[str, ...] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self.labels == other.labels

    def __hash__(self) -> int:
        return self._hash

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __repr__(self) -> str:
        return f"LabelSet({', '.join(map(str, self.labels))})"

    def strings(self) -> tuple[str, ...]:
        """Canonical ``source:key=value`` strings, sorted."""
        if self._strings is None:
            self._strings = tuple(str(label) for label in self.labels)
        return self._strings

    def values(self, source: str, key: str) -> list[str]:
        """Values of ``key`` from ``source`` (``any`` = every source)."""
        pairs = self._by_key.get(key, ())
        if source == ANY_SOURCE:
            return [value for _, value in pairs]
        return [value for src, value in pairs if src == source]

    def pairs(self) -> Iterator[tuple[str, str]]:
        """``(key, value)`` of every label (for indexing)."""
        for label in self.labels:
            yield label.key, label.value


def parse_key(raw: str) -> tuple[str, str]:
    """Split a selector key into ``(source, key)``; no prefix means ``any``."""
    source, sep, key = raw.partition(":")
    if not sep:
        return ANY_SOURCE, raw
    return source, key


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One normalised requirement of a selector."""

    source: str
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        present = labels.values(self.source, self.key)
        if self.operator == "In":
            return any(value in self.values for value in present)
        if self.operator == "NotIn":
            return not any(value in self.values for value in present)
        if self.operator == "Exists":
            return bool(present)
        return not present


@dataclass(frozen=True, slots=True)
class Selector:
    """A normalised, hashable selector: all requirements must hold; none = everything."""

    requirements: tuple[Requirement, ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.requirements))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def of(cls, requirements: Iterable[Requirement]) -> Selector:
        return cls(tuple(sorted(set(requirements))))

    def matches(self, labels: LabelSet) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def with_requirements(self, extra: Iterable[Requirement]) -> Selector:
        return Selector.of((*self.requirements, *extra))

    def names_namespace(self) -> bool:
        return any(r.key == NAMESPACE_KEY and r.source in (K8S_SOURCE, ANY_SOURCE) for r in self.requirements)

    def uses_namespace_labels(self) -> bool:
        return any(r.key.startswith(NAMESPACE_LABELS_PREFIX) for r in self.requirements)

    def uses_reserved(self) -> bool:
        return any(r.source == RESERVED_SOURCE for r in self.requirements)

    def describe(self) -> str:
        if not self.requirements:
            return "{}"
        return ", ".join(
            f"{r.source}:{r.key} {r.operator} {list(r.values)}" if r.values else f"{r.source}:{r.key} {r.operator}"
            for r in self.requirements
        )


def from_api(selector: LabelSelector | None) -> Selector:
    """Normalise a wire selector (``None`` selects everything, like ``{}``)."""
    if selector is None:
        return Selector()
    requirements: list[Requirement] = []
    for raw_key, value in (selector.match_labels or {}).items():
        source, key = parse_key(raw_key)
        requirements.append(Requirement(source, key, "In", (value,)))
    for expression in selector.match_expressions or ():
        source, key = parse_key(expression.key)
        values = tuple(sorted(set(expression.values or ())))
        requirements.append(Requirement(source, key, expression.operator, values))
    return Selector.of(requirements)


def namespace_is(namespace: str) -> Requirement:
    return Requirement(K8S_SOURCE, NAMESPACE_KEY, "In", (namespace,))


NAMESPACE_EXISTS = Requirement(K8S_SOURCE, NAMESPACE_KEY, "Exists")


def scope_subject(selector: Selector, namespace: str) -> Selector:
    """Scope an ``endpointSelector``: a CNP's namespace always wins; a CCNP (``""``) is unscoped."""
    if not namespace:
        return selector
    if any(r.source == RESERVED_SOURCE and r.key == "init" for r in selector.requirements):
        return selector
    kept = [
        r for r in selector.requirements
        if not (r.key == NAMESPACE_KEY and r.source in (K8S_SOURCE, ANY_SOURCE))
    ]
    return Selector.of([*kept, namespace_is(namespace)])


def scope_peer(selector: Selector, namespace: str) -> Selector:
    """Scope a ``fromEndpoints``/``toEndpoints``/``*Requires`` selector of a CNP (or CCNP when ``""``)."""
    if selector.names_namespace() or selector.uses_reserved():
        return selector
    if namespace:
        if selector.uses_namespace_labels():
            return selector.with_requirements([NAMESPACE_EXISTS])
        return selector.with_requirements([namespace_is(namespace)])
    return selector.with_requirements([NAMESPACE_EXISTS])


class SelectionIndex:
    """Label sets by id, with posting lists so a selector finds its matches without a full scan."""

    def __init__(self) -> None:
        self._labels: dict[int, LabelSet] = {}
        self._postings: dict[tuple[str, str], set[int]] = {}
        self._by_key: dict[str, set[int]] = {}

    def __contains__(self, ident: int) -> bool:
        return ident in self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def ids(self) -> Iterable[int]:
        return self._labels.keys()

    def labels(self, ident: int) -> LabelSet:
        return self._labels[ident]

    def items(self) -> Iterable[tuple[int, LabelSet]]:
        return self._labels.items()

    def add(self, ident: int, labels: LabelSet) -> None:
        if ident in self._labels:
            self.remove(ident)
        self._labels[ident] = labels
        for key, value in labels.pairs():
            self._postings.setdefault((key, value), set()).add(ident)
            self._by_key.setdefault(key, set()).add(ident)

    def remove(self, ident: int) -> None:
        labels = self._labels.pop(ident, None)
        if labels is None:
            return
        for key, value in labels.pairs():
            posting = self._postings.get((key, value))
            if posting is not None:
                posting.discard(ident)
                if not posting:
                    del self._postings[(key, value)]
            keyed = self._by_key.get(key)
            if keyed is not None:
                keyed.discard(ident)
                if not keyed:
                    del self._by_key[key]

    def select(self, selector: Selector) -> frozenset[int]:
        """Ids whose label set matches ``selector``."""
        candidates: Iterable[int] | None = None
        best = -1
        for r in selector.requirements:
            if r.operator == "In":
                found: set[int] = set()
                for value in r.values:
                    found |= self._postings.get((r.key, value), set())
            elif r.operator == "Exists":
                found = self._by_key.get(r.key, set())
            else:
                continue
            if candidates is None or len(found) < best:
                candidates, best = found, len(found)
        pool: Iterable[int] = self._labels.keys() if candidates is None else candidates
        return frozenset(i for i in pool if selector.matches(self._labels[i]))


def match_labels_mapping(selector: Selector, labels: Mapping[str, str], source: str = K8S_SOURCE) -> bool:
    """Match a plain ``{key: value}`` mapping whose labels all come from ``source``."""
    return selector.matches(LabelSet(Label(source, k, v) for k, v in labels.items()))
