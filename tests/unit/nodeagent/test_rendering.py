"""rendering: golden files, determinism, and "only switches and sizes vary"."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

import pytest

from ciliary.nodeagent import rendering

GOLDEN = Path(__file__).with_name("golden")
CTX = rendering.RenderContext(pin_dir="/sys/fs/bpf/ciliary/golden-node")


@pytest.mark.parametrize("hook", rendering.HOOKS)
def test_render_matches_golden_file(hook: str) -> None:
    program = rendering.render(CTX, hook)
    path = GOLDEN / f"tc_{hook}.c"
    if os.environ.get("CILIARY_UPDATE_GOLDEN") == "1":
        path.write_text(program.source)
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), program.source.splitlines(True),
                                        "golden", "rendered", n=1))
    assert program.source == expected, f"re-run with CILIARY_UPDATE_GOLDEN=1 if intended:\n{diff[:3000]}"


@pytest.mark.parametrize("hook", rendering.HOOKS)
def test_render_is_deterministic_and_hashed(hook: str) -> None:
    first = rendering.render(CTX, hook)
    second = rendering.render(dataclasses.replace(CTX), hook)
    assert first == second
    assert len(first.sha256) == 64
    assert first.name == f"cy_{hook}"
    assert f"int cy_{hook}(struct __sk_buff *skb)" in first.source


def test_every_local_include_is_inlined_once() -> None:
    source = rendering.render(CTX, "from_pod").source
    assert not re.search(r'^#include "', source, re.MULTILINE)
    for header in ("include/maps.h", "lib/policy.h", "lib/conntrack.h", "lib/enforce.h"):
        assert source.count(f"/* ---- {header} ---- */") == 1


def test_only_defines_change_with_the_context() -> None:
    other = dataclasses.replace(CTX, policy_size=1024, ct_size=4096, trace_all=True, events_pages=8)
    a = rendering.render(CTX, "to_pod")
    b = rendering.render(other, "to_pod")
    assert a.sha256 != b.sha256
    changed = [line for line in difflib.ndiff(a.source.splitlines(), b.source.splitlines())
               if line.startswith(("+ ", "- "))]
    assert changed and all(line[2:].startswith("#define CY_") for line in changed)


def test_both_hooks_declare_the_same_maps() -> None:
    def maps_of(src: str) -> list[str]:
        return re.findall(r'CY_PIN_DIR "/(cy_[a-z_]+)"', src)

    names = maps_of(rendering.render(CTX, "from_pod").source)
    assert names == maps_of(rendering.render(CTX, "to_pod").source)
    assert all(len(n) <= 15 for n in names)
    assert set(names) == {"cy_ipcache", "cy_endpoints", "cy_ep_ifindex", "cy_policy", "cy_policy_deny", "cy_ct",
                          "cy_counters", "cy_lost", "cy_events"}


@pytest.mark.parametrize("bad", [{"pin_dir": "relative"}, {"pin_dir": '/x"y'}, {"events_pages": 3},
                                 {"policy_size": 0}])
def test_context_rejects_bad_values(bad: dict[str, object]) -> None:
    fields = {"pin_dir": "/sys/fs/bpf/ciliary/n", **bad}
    with pytest.raises(ValueError):
        rendering.RenderContext(**fields)  # type: ignore[arg-type]


def test_unknown_hook_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hook"):
        rendering.render(CTX, "xdp")
