"""The project's own images (the Dockerfile's ``operator`` and ``agent`` targets), built without docker.

Assembled with ``ciliary.lab.ociimage`` rather than buildah: Debian bookworm's buildah (1.28)
predates Dockerfile heredocs, which the agent target uses, and a Dockerfile build would run
``apt-get`` and ``pip`` inside build containers that need their own network set-up. What the
Dockerfile states as data is read from it (one source of truth): each target's ENTRYPOINT and
USER, the base stage's ENV, the agent stage's Debian packages and the agent's entrypoint script (its
heredoc). Layers:

1. a root filesystem from ``mmdebstrap --variant=minbase`` with the Debian packages the target's
   stages install, the venv ``/opt/ciliary/venv`` created inside it and the locked dependencies
   installed into it from a wheelhouse built on the host (same Debian, same python3); for the
   agent also Debian's bcc linked into the venv and the kernel headers moved to
   ``/opt/ciliary/kernel-headers``, as the Dockerfile does;
2. the project: its wheel unpacked into the venv's site-packages, console scripts, and for the
   agent the entrypoint script.

The agent's ``/opt/ciliary-cni`` (the Dockerfile's ``cni-runtime`` stage, a CPython uv downloads) is
made by ``ciliary.lab.cniruntime`` from this host's python3 instead (same layout, so the chart's
``install-cni`` runs unchanged).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ciliary.lab import cniruntime, images
from ciliary.lab.images import BuiltImage, ImageBuildError, RootfsSpec
from ciliary.lab.ociimage import FileEntry, ImageConfig

VENV = "/opt/ciliary/venv"
IMAGE_REPOSITORY = "ghcr.io/ciliary/ciliary"
OPERATOR_PACKAGES = ("python3", "python3-venv", "ca-certificates")


@dataclass(frozen=True)
class TargetFacts:
    """What the Dockerfile says about one final target."""

    entrypoint: tuple[str, ...]
    user: str = ""
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # heredoc COPYs: destination → content


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name → its logical lines (continuations joined; heredoc bodies kept as one line each)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    lines = dockerfile.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", line)
        if heredoc and line.split()[0] in ("COPY", "RUN"):
            body = []
            while i < len(lines) and lines[i] != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line = line + "\n" + "\n".join(body) + "\n"
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        else:
            current.append(line)
    return stages


def target_facts(dockerfile: str, target: str) -> TargetFacts:
    """ENTRYPOINT, USER and heredoc files of ``target``, ENV of the ``base`` stage."""
    stages = _stages(dockerfile)
    if target not in stages:
        raise ImageBuildError(target, "no such Dockerfile target")
    env: dict[str, str] = {}
    for line in stages.get("base", []):
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[key] = value
    entrypoint: tuple[str, ...] = ()
    user = ""
    files: dict[str, str] = {}
    for line in stages[target]:
        if line.startswith("ENTRYPOINT "):
            entrypoint = tuple(json.loads(line[len("ENTRYPOINT "):]))
        elif line.startswith("USER "):
            user = line.split()[1]
        elif line.startswith("COPY ") and "\n" in line:
            head, _, body = line.partition("\n")
            files[head.split()[-1]] = body
    if not entrypoint:
        raise ImageBuildError(target, "the Dockerfile target has no ENTRYPOINT")
    return TargetFacts(entrypoint, user, env, files)


def apt_packages(dockerfile: str, target: str) -> tuple[str, ...]:
    """The Debian packages the ``target`` stage itself installs (its ``apt-get install`` lines)."""
    stages = _stages(dockerfile)
    if target not in stages:
        raise ImageBuildError(target, "no such Dockerfile target")
    found: list[str] = []
    for line in stages[target]:
        for command in re.findall(r"apt-get install ([^&]*)", line):
            found += [word for word in command.split() if not word.startswith("-")]
    return tuple(found)


def agent_packages(root: Path) -> tuple[str, ...]:
    """The operator's packages plus what the Dockerfile's agent stage installs."""
    own = apt_packages((root / "Dockerfile").read_text(), "agent")
    return (*OPERATOR_PACKAGES, *(p for p in own if p not in OPERATOR_PACKAGES))


def project_dependencies(root: Path) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


def _digest_files(paths: list[Path], root: Path | None = None) -> str:
    """Over the files' contents and their names relative to ``root`` (else their base names): the same
    tree in another checkout (a worktree, skaffold's copy) has the same digest and reuses the cache."""
    h = hashlib.sha256()
    for p in sorted(paths):
        name = p.relative_to(root).as_posix() if root else p.name
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def wheelhouse(root: Path) -> Path:
    """The locked dependencies as wheels for this python3 (cached by pyproject + lock)."""
    key = _digest_files([root / "pyproject.toml", root / "setup" / "requirements-lock.txt"], root)
    out = images.images_dir() / "wheels" / key
    if (out / ".complete").exists():
        return out
    with images.build_lock(out):
        return out if (out / ".complete").exists() else _pip_wheel(root, out)


def _pip_wheel(root: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(out),
                           "-c", str(root / "setup" / "requirements-lock.txt"), *project_dependencies(root)],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise ImageBuildError("wheelhouse", f"pip wheel failed: {proc.stderr[-2000:]}")
    (out / ".complete").write_text("")
    return out


def rootfs_spec(root: Path, suite: str, agent: bool) -> RootfsSpec:
    wheels = wheelhouse(root)
    deps = " ".join(f"'{d}'" for d in project_dependencies(root))
    hooks = [
        f'copy-in {wheels} /tmp',
        f'chroot "$1" python3 -m venv {VENV}',
        f'chroot "$1" {VENV}/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check '
        f'--find-links /tmp/{wheels.name} {deps}',
        f'rm -rf "$1/tmp/{wheels.name}"',
    ]
    if agent:
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        hooks += ['mkdir -p "$1/opt/ciliary/kernel-headers"',
                  'mv "$1"/usr/src/linux-headers-* "$1/opt/ciliary/kernel-headers/"',
                  f'ln -sfn /usr/lib/python3/dist-packages/bcc "$1{VENV}/lib/{py}/site-packages/bcc"']
    return RootfsSpec("ciliary-agent" if agent else "ciliary-operator", suite,
                      agent_packages(root) if agent else OPERATOR_PACKAGES, hooks=tuple(hooks),
                      inputs=(sorted(p.name for p in wheels.glob("*.whl")).__repr__(),))


def project_wheel(root: Path, into: Path) -> Path:
    # setuptools builds in <root>/build: one wheel build per checkout at a time (two labs of one checkout)
    checkout = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with images.build_lock(images.images_dir() / "locks" / f"wheel-{checkout}"):
        return _build_wheel(root, into)


def _build_wheel(root: Path, into: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                           "-w", str(into), str(root)], capture_output=True, text=True, timeout=600, cwd=into)
    # setuptools builds in <root>/build and never removes a module deleted from the source (as setup.sh)
    shutil.rmtree(root / "build", ignore_errors=True)
    if proc.returncode != 0:
        raise ImageBuildError("ciliary wheel", f"pip wheel failed: {proc.stderr[-2000:]}")
    (wheel,) = into.glob("ciliary-*.whl")
    return wheel


def wheel_entries(wheel: Path, unpack: Path) -> list[FileEntry]:
    """The wheel unpacked into the venv's site-packages, plus its console scripts."""
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = f"{VENV}/lib/{py}/site-packages"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpack)
    entries = [FileEntry(f"{site}/{p.relative_to(unpack).as_posix()}", source=p, mode=0o644)
               for p in sorted(unpack.rglob("*")) if p.is_file()]
    dist_info = next(unpack.glob("*.dist-info"))
    parser = configparser.ConfigParser()
    parser.read(dist_info / "entry_points.txt")
    scripts = parser["console_scripts"] if parser.has_section("console_scripts") else {}
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        body = f"#!{VENV}/bin/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        entries.append(FileEntry(f"{VENV}/bin/{name}", data=body.encode(), mode=0o755))
    return entries


SOURCE_DIRS = ("operator", "nodeagent", "e2e/ciliary", "datapath_c")


def source_digest(root: Path) -> str:
    """Over what goes into the project's wheel (sources, package data, pyproject)."""
    files = [root / "pyproject.toml", root / "README.md"]
    for d in SOURCE_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return _digest_files(files, root)


def project_image(root: Path, suite: str, target: str, tag: str) -> BuiltImage:
    facts = target_facts((root / "Dockerfile").read_text(), target)
    spec = rootfs_spec(root, suite, agent=target == "agent")
    reference = f"{IMAGE_REPOSITORY}-{target}:{tag}"
    config = ImageConfig(entrypoint=list(facts.entrypoint), env=facts.env, user=facts.user)
    agent = target == "agent"
    key_parts = [spec.key(), source_digest(root), json.dumps(facts.files, sort_keys=True),
                 *(["cni-runtime", cniruntime.__name__, _digest_files([Path(cniruntime.__file__)]),
                    sys.version] if agent else [])]
    hit = images.cached(reference, key_parts, config)
    if hit:
        return hit
    base = images.build_rootfs(spec)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = project_wheel(root, Path(tmp))
        entries = wheel_entries(wheel, Path(tmp) / "unpacked")
        entries += [FileEntry(dest, data=body.encode(), mode=0o755) for dest, body in facts.files.items()]
        if agent:
            entries += cniruntime.runtime_entries(root, wheelhouse(root), Path(tmp) / "cni-deps")
        return images.assemble(reference, base, entries, config, key_parts=key_parts,
                               history=[f"mmdebstrap minbase {suite} + {' '.join(spec.packages)} + venv",
                                        "ciliary wheel"])


def project_images(root: Path, suite: str) -> list[BuiltImage]:
    tag = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    return [project_image(root, suite, target, tag) for target in ("operator", "agent")]
