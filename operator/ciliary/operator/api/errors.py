"""Typed errors of the ``cilium.io/v2`` API layer, each naming the object it concerns.

Owns :class:`PolicyProblem` (one finding: a field path and a message),
:class:`PolicyError` and its subclasses :class:`PolicyParseError` (the object
does not fit the API) and :class:`PolicyInvalidError` (it fits but its meaning
is refused), plus :func:`problems_from_validation_error`, the one place that
turns pydantic's errors into user-readable paths and messages. Handlers
translate these errors into status conditions and Events; nothing here knows
about kopf.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class PolicyProblem:
    """One problem found in a policy: where (``spec.ingress[0].toPorts[0]``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyError(Exception):
    """Base of errors about one policy object, identified by kind, namespace ("" if cluster-scoped) and name."""

    def __init__(self, kind: str, namespace: str, name: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.message = message

    @property
    def ref(self) -> str:
        """The object as a user would name it, e.g. ``CiliumNetworkPolicy default/allow-web``."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    def __str__(self) -> str:
        return f"{self.ref}: {self.message}"


def _join(problems: Sequence[PolicyProblem]) -> str:
    return "; ".join(str(p) for p in problems)


class PolicyParseError(PolicyError):
    """The object does not fit the ``cilium.io/v2`` API (unknown field, wrong type, out-of-range value)."""

    def __init__(
        self,
        kind: str,
        namespace: str,
        name: str,
        message: str,
        problems: Sequence[PolicyProblem] = (),
    ) -> None:
        super().__init__(kind, namespace, name, message)
        self.problems = tuple(problems)

    @classmethod
    def from_problems(
        cls, kind: str, namespace: str, name: str, problems: Sequence[PolicyProblem]
    ) -> PolicyParseError:
        """Build the error whose message lists every problem."""
        return cls(kind, namespace, name, _join(problems), problems)


class PolicyInvalidError(PolicyError):
    """The object parses, but semantic validation refused it (see ``ciliary.operator.api.validation``)."""

    def __init__(self, kind: str, namespace: str, name: str, problems: Sequence[PolicyProblem]) -> None:
        super().__init__(kind, namespace, name, _join(problems))
        self.problems = tuple(problems)


def format_path(loc: Iterable[str | int], prefix: str = "") -> str:
    """Render a location as a field path: ``("spec", "ingress", 0, "toPorts")`` → ``spec.ingress[0].toPorts``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out


def _quote(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _message(error: Any, path: str) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f'unknown field "{path}"'
    if kind == "missing":
        return "Required value"
    if kind == "literal_error":
        return f"Unsupported value: {_quote(error.get('input'))}: supported values: {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


_UNION_TAGS = frozenset({"int", "str", "bool", "float"})


def _is_union_tag(part: str | int) -> bool:
    # For union-typed fields pydantic inserts the member it tried ("int", "str",
    # "function-after[...]") into the location; wire field names never look like that.
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "(" in part)


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    return [p for p in loc if not _is_union_tag(p)]


def problems_from_validation_error(error: ValidationError, prefix: str = "") -> list[PolicyProblem]:
    """Turn a pydantic ``ValidationError`` into problems with wire-name paths and readable messages."""
    problems: list[PolicyProblem] = []
    seen: set[tuple[str, str]] = set()
    for item in error.errors(include_url=False):
        path = format_path(_clean_loc(item["loc"]), prefix)
        message = _message(item, path)
        if (path, message) not in seen:
            seen.add((path, message))
            problems.append(PolicyProblem(path, message))
    return problems
