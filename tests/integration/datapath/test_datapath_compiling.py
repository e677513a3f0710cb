"""Compiling in a child process: typed failures with their logs, pins as the cache, adoption checks.

The agent process never runs clang: ``compiling.compile_and_pin`` runs
``ciliary.nodeagent.datapath.compiler`` in a child that pins each verified
program under its rendered hash; an engine finding that pin adopts it and
compiles nothing, unless one of the program's maps is no longer pinned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dp_topology import Topology

from ciliary.nodeagent import rendering
from ciliary.nodeagent.datapath import compiling, engine, errors, loading

pytestmark = pytest.mark.integration

ENTRY = "return cy_enforce(skb, CY_DIR_EGRESS);"


def _templates(tmp_path: Path, body: str) -> Path:
    """A copy of datapath_c whose from_pod entry function runs ``body`` instead."""
    root = tmp_path / "datapath_c"
    shutil.copytree(rendering.DATAPATH_C_DIR, root)
    program = root / "programs" / "tc_from_pod.c.j2"
    text = program.read_text()
    assert ENTRY in text
    program.write_text(text.replace(ENTRY, body))
    return root


def _remove_pins(pin_dir: Path) -> None:
    if pin_dir.exists():
        for pinned in pin_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                pinned.unlink()
        with contextlib.suppress(OSError):
            pin_dir.rmdir()


@pytest.fixture
def node(topology: Topology, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"cyt-{topology.tag}-{request.node.name[5:15]}".replace("_", "-")
    yield name
    _remove_pins(Path("/sys/fs/bpf/ciliary") / name)


def test_a_compile_failure_is_typed_and_carries_the_compiler_log(
        topology: Topology, node: str, tmp_path: Path) -> None:
    dp = engine.Datapath(node, netns=topology.node_ns,
                         template_root=_templates(tmp_path, "return no_such_symbol_cy;"))
    before = compiling.compile_count()
    with pytest.raises(errors.CompileFailed) as info:
        dp.start()
    assert info.value.hook == "from_pod" and "no_such_symbol_cy" in info.value.message
    assert compiling.compile_count() == before + 1  # the child stops at the first failure
    assert not list((Path("/sys/fs/bpf/ciliary") / node).glob("prog_*"))


def test_a_verifier_rejection_is_typed_and_carries_the_verifier_log(
        topology: Topology, node: str, tmp_path: Path) -> None:
    unchecked = "return *(volatile __u32 *)(long)skb->data;"  # packet access without a bounds check
    dp = engine.Datapath(node, netns=topology.node_ns, template_root=_templates(tmp_path, unchecked))
    with pytest.raises(errors.VerifierRejected) as info:
        dp.start()
    assert info.value.hook == "from_pod" and "invalid access to packet" in info.value.log
    assert not list((Path("/sys/fs/bpf/ciliary") / node).glob("prog_*"))


def test_pinned_programs_are_the_cache_and_are_adopted_only_with_their_maps(
        topology: Topology, node: str) -> None:
    pin_dir = Path("/sys/fs/bpf/ciliary") / node
    first = engine.Datapath(node, netns=topology.node_ns)
    before = compiling.compile_count()
    first.start()
    assert compiling.compile_count() == before + 2
    hashes = first.program_hashes
    assert all(loading.program_pin_path(pin_dir, h, sha).exists() for h, sha in hashes.items())
    first.close()

    second = engine.Datapath(node, netns=topology.node_ns)
    second.start()  # same hashes pinned: adopted, nothing compiled
    assert compiling.compile_count() == before + 2 and second.program_hashes == hashes
    second.close()

    (pin_dir / "cy_ct").unlink()  # the pinned programs now use a map nobody can reach
    third = engine.Datapath(node, netns=topology.node_ns)
    third.start()
    assert compiling.compile_count() == before + 4 and third.program_hashes == hashes
    assert (pin_dir / "cy_ct").exists()
    pinned_ct = loading.pinned_map_info(pin_dir / "cy_ct")
    assert pinned_ct is not None
    for hook, sha in hashes.items():
        fd = loading.open_pinned(loading.program_pin_path(pin_dir, hook, sha))
        try:
            assert loading.uses_only(fd, [pin_dir / name for name in engine.MAP_NAMES])
        finally:
            os.close(fd)
    third.close()
