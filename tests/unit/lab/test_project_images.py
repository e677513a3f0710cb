"""What the project images take from the Dockerfile, and how the project wheel becomes a layer."""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import pytest

from ciliary.lab import images, projectimages
from ciliary.lab.images import ImageBuildError

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_operator_facts_come_from_the_dockerfile() -> None:
    facts = projectimages.target_facts(DOCKERFILE, "operator")
    assert facts.entrypoint == ("ciliary-operator",)
    assert facts.user == "65532:65532"
    assert facts.env["PATH"].startswith("/opt/ciliary/venv/bin:")
    assert facts.env["PYTHONUNBUFFERED"] == "1"
    assert facts.files == {}


def test_agent_facts_include_the_entrypoint_script_heredoc() -> None:
    facts = projectimages.target_facts(DOCKERFILE, "agent")
    assert facts.entrypoint == ("ciliary-agent-entrypoint",)
    assert facts.user == ""
    script = facts.files["/usr/local/bin/ciliary-agent-entrypoint"]
    assert script.startswith("#!/bin/sh\n") and 'exec ciliary-agent "$@"' in script
    assert "EOF" not in script


def test_the_agent_image_gets_the_packages_its_stage_installs() -> None:
    packages = projectimages.agent_packages(ROOT)
    assert {"python3-bpfcc", "bpftool", "iproute2", "iptables", "linux-headers-amd64"} <= set(packages)
    assert packages[:len(projectimages.OPERATOR_PACKAGES)] == projectimages.OPERATOR_PACKAGES
    assert projectimages.apt_packages("FROM x AS agent\nRUN apt-get update \\\n && apt-get install -y "
                                      "--no-install-recommends a b \\\n c && rm -rf y\n", "agent") == ("a", "b", "c")


def test_an_unknown_target_is_refused() -> None:
    with pytest.raises(ImageBuildError):
        projectimages.target_facts(DOCKERFILE, "nope")


def test_heredoc_and_continuations_are_parsed() -> None:
    text = (
        "ARG X=1\nFROM debian AS base\nENV A=1 \\\n    B=/x:/y\n"
        "FROM base AS app\nRUN echo a \\\n && echo b\nCOPY --chmod=0755 <<'EOF' /bin/run\n#!/bin/sh\necho hi\nEOF\n"
        'USER 1:1\nENTRYPOINT ["/bin/run", "--flag"]\n'
    )
    facts = projectimages.target_facts(text, "app")
    assert facts.env == {"A": "1", "B": "/x:/y"}
    assert facts.entrypoint == ("/bin/run", "--flag") and facts.user == "1:1"
    assert facts.files == {"/bin/run": "#!/bin/sh\necho hi\n"}


def test_wheel_entries_unpack_into_the_venv_with_console_scripts(tmp_path: Path) -> None:
    wheel = tmp_path / "ciliary-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ciliary/operator/main.py", "def main():\n    return 0\n")
        z.writestr("ciliary-0.1.0.dist-info/entry_points.txt",
                   "[console_scripts]\nciliary-operator = ciliary.operator.main:main\n")
    entries = {e.path: e for e in projectimages.wheel_entries(wheel, tmp_path / "unpacked")}
    site = [p for p in entries if p.endswith("/site-packages/ciliary/operator/main.py")]
    assert len(site) == 1 and site[0].startswith("/opt/ciliary/venv/lib/python3.")
    script = entries["/opt/ciliary/venv/bin/ciliary-operator"]
    assert script.mode == 0o755 and script.data is not None
    assert script.data.decode().startswith("#!/opt/ciliary/venv/bin/python\n")
    assert "from ciliary.operator.main import main" in script.data.decode()


def test_source_digest_changes_with_a_source_file(tmp_path: Path) -> None:
    for d in projectimages.SOURCE_DIRS:
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "README.md").write_text("r\n")
    (tmp_path / "operator" / "a.py").write_text("x = 1\n")
    first = projectimages.source_digest(tmp_path)
    (tmp_path / "operator" / "a.py").write_text("x = 2\n")
    assert projectimages.source_digest(tmp_path) != first


def test_the_same_tree_in_another_checkout_has_the_same_digests(tmp_path: Path) -> None:
    """A worktree or skaffold's copy of the repository reuses the image cache (keys never name the path)."""
    trees = [tmp_path / "one", tmp_path / "elsewhere" / "two"]
    for root in trees:
        for d in projectimages.SOURCE_DIRS:
            (root / d).mkdir(parents=True)
        (root / "pyproject.toml").write_text("[project]\n")
        (root / "README.md").write_text("r\n")
        (root / "operator" / "a.py").write_text("x = 1\n")
    assert projectimages.source_digest(trees[0]) == projectimages.source_digest(trees[1])
    # a file moved to another directory is a different tree
    (trees[1] / "operator" / "a.py").rename(trees[1] / "nodeagent" / "a.py")
    assert projectimages.source_digest(trees[0]) != projectimages.source_digest(trees[1])


def test_builds_of_one_cache_entry_take_turns(tmp_path: Path) -> None:
    """Two builders of the same key (two checkouts, two sessions) never write the entry at the same time."""
    inside: list[int] = []
    overlapped = threading.Event()

    def build() -> None:
        with images.build_lock(tmp_path / "entry.tar"):
            inside.append(1)
            if len(inside) > 1:
                overlapped.set()
            threading.Event().wait(0.2)
            inside.pop()

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not overlapped.is_set()
    assert (tmp_path / "entry.tar.lock").exists() and not (tmp_path / "entry.tar").exists()


def test_the_cache_keeps_the_newest_builds_of_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new build removes the oldest, never one another session may still import (the newest few stay)."""
    monkeypatch.setenv("CILIARY_CACHE", str(tmp_path))
    built = []
    for n in range(images.KEPT_BUILDS + 2):
        built.append(images.assemble("docker.io/lab/t:1", None, [images.FileEntry("/f", data=str(n).encode())],
                                     images.ImageConfig(entrypoint=["/f"]), key_parts=[str(n)], history=["t"]))
        os.utime(built[-1].archive.parent, (1000 + n, 1000 + n))
    kept = [b for b in built if b.archive.exists()]
    assert kept == built[-images.KEPT_BUILDS:]
    # a second build of a kept key is the cached one
    again = images.assemble("docker.io/lab/t:1", None, [images.FileEntry("/f", data=b"x")],
                            images.ImageConfig(entrypoint=["/f"]), key_parts=[str(images.KEPT_BUILDS + 1)],
                            history=["t"])
    assert again == built[-1]
