"""The ``Valid`` condition of a policy: computed purely, written only when it changes.

``valid_condition`` builds the condition from the parse/validation outcome;
``needs_write`` compares it with what the object already shows, so an operator
restart (or a repeated event) writes nothing when nothing changed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from ciliary.operator.api import PolicyProblem

MAX_MESSAGE = 1024


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def problems_message(problems: Sequence[PolicyProblem]) -> str:
    text = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def valid_condition(problems: Sequence[PolicyProblem] | None, generation: int) -> dict[str, Any]:
    if problems:
        return {"type": "Valid", "status": "False", "reason": "InvalidPolicy",
                "message": problems_message(problems), "observedGeneration": generation}
    return {"type": "Valid", "status": "True", "reason": "Validated",
            "message": "Policy is valid and was accepted for enforcement", "observedGeneration": generation}


def current_condition(body: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def needs_write(body: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    have = current_condition(body, str(wanted["type"]))
    if have is None:
        return True
    return any(have.get(k) != wanted[k] for k in ("status", "reason", "message", "observedGeneration"))


def merged_conditions(body: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[dict[str, Any]]:
    """All conditions of ``body`` with ``wanted`` replacing its type (transition time kept if status same)."""
    out = []
    have = current_condition(body, str(wanted["type"]))
    new = dict(wanted)
    new["lastTransitionTime"] = (have or {}).get("lastTransitionTime") if have and have.get("status") == \
        wanted["status"] else _now()
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") != wanted["type"]:
            out.append(dict(cond))
    out.append(new)
    return sorted(out, key=lambda c: str(c.get("type")))
