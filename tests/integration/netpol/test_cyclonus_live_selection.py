"""The live run's tag list selects, in the pinned cyclonus's own generator (its offline mock cluster),
exactly the kinds of cases the list says: none of what it leaves out, each carrying an included tag."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ciliary.lab import cyclonus_live

LIST = Path(__file__).resolve().parents[3] / "e2e" / "conformance" / "cyclonus.txt"


def test_the_list_selects_what_it_says_in_cyclonus_itself(tool: Callable[[str], Path]) -> None:
    tool("cyclonus")
    tags = cyclonus_live.read_tags(LIST)
    cases = cyclonus_live.dry_run(tags, cyclonus_live.Settings())
    assert len(cases) == 38  # the count the list's comment and the README give
    assert [c.number for c in cases] == list(range(1, len(cases) + 1))
    for case in cases:
        assert set(case.tags) & set(tags.focus), case
        assert not set(case.tags) & set(tags.skip), case
    assert {t for c in cases for t in c.tags} >= {"ingress", "egress", "named-port", "end-port", "action",
                                                  "namespaces-by-default-label", "pods-by-label",
                                                  "namespaces-by-label", "deny-all"}
