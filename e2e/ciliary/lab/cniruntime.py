"""The agent image's ``/opt/ciliary-cni`` for lab images: a relocated copy of this host's python3 with only
the CNI plugin and its two dependencies, which the chart's ``install-cni`` copies onto the node.

The Dockerfile's ``cni-runtime`` stage puts a python-build-standalone CPython there (fetched by uv). The
lab builds without network downloads beyond Debian's and PyPI's, so it relocates Debian's own
interpreter instead: ``python/bin/python3`` (Debian links libpython statically; it needs only libc, libm,
libz and libexpat, present on every Debian host, which is what a lab node is), the standard library under
``python/lib/python3.X`` (found relative to the executable), and ``pydantic``, ``pydantic_core``,
``pyroute2`` and their dependencies plus ``ciliary.cni`` in ``python/lib/python3/dist-packages`` (the
directory Debian's ``site`` adds for a relocated prefix). The layout ``install-cni`` expects
(``python/bin/python3 -I -m ciliary.cni.main``) is the same; only the interpreter's origin differs, so
this runtime runs on Debian-like hosts only — a lab limitation, not the product's.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from ciliary.lab.images import ImageBuildError
from ciliary.lab.ociimage import FileEntry

PREFIX = "/opt/ciliary-cni/python"
#: distributions the CNI plugin imports (pydantic's own dependencies included)
CNI_DISTRIBUTIONS = ("pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection",
                     "pyroute2")
#: standard-library parts the plugin never loads
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__", "pydoc_data",
               "config-3")


def _python_version() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def stdlib_entries(stdlib: Path) -> list[FileEntry]:
    py = _python_version()
    entries = []
    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib)
        if any(part in STDLIB_SKIP or part.startswith(STDLIB_SKIP[-1]) for part in rel.parts):
            continue
        if path.is_file() and not path.is_symlink():
            entries.append(FileEntry(f"{PREFIX}/lib/{py}/{rel.as_posix()}", source=path, mode=0o644))
    return entries


def wheel_distribution(name: str) -> str:
    """The distribution name a wheel file starts with, normalised (``pydantic_core-2...whl`` → pydantic_core)."""
    return name.split("-", 1)[0].lower().replace("-", "_")


def dependency_entries(wheelhouse: Path, unpack: Path) -> list[FileEntry]:
    wanted = set(CNI_DISTRIBUTIONS)
    wheels = [w for w in sorted(wheelhouse.glob("*.whl")) if wheel_distribution(w.name) in wanted]
    found = {wheel_distribution(w.name) for w in wheels}
    if found != wanted:
        raise ImageBuildError("cni runtime", f"wheels missing from {wheelhouse}: {sorted(wanted - found)}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpack)
    site = f"{PREFIX}/lib/python3/dist-packages"
    return [FileEntry(f"{site}/{p.relative_to(unpack).as_posix()}", source=p, mode=0o755 if p.suffix == ".so"
                      else 0o644) for p in sorted(unpack.rglob("*")) if p.is_file()]


def plugin_entries(root: Path) -> list[FileEntry]:
    cni = root / "nodeagent" / "ciliary" / "cni"
    site = f"{PREFIX}/lib/python3/dist-packages/ciliary/cni"
    return [FileEntry(f"{site}/{p.relative_to(cni).as_posix()}", source=p, mode=0o644)
            for p in sorted(cni.rglob("*.py"))]


def runtime_entries(root: Path, wheelhouse: Path, unpack: Path, *, interpreter: Path | None = None,
                    stdlib: Path | None = None) -> list[FileEntry]:
    """Every file of ``/opt/ciliary-cni`` (the interpreter and stdlib of this host's python3 by default)."""
    interpreter = interpreter or Path(sys.executable).resolve()
    stdlib = stdlib or Path(f"/usr/lib/{_python_version()}")
    if not (stdlib / "os.py").exists():
        raise ImageBuildError("cni runtime", f"no standard library at {stdlib}")
    return [FileEntry(f"{PREFIX}/bin/python3", source=interpreter, mode=0o755),
            *stdlib_entries(stdlib), *dependency_entries(wheelhouse, unpack), *plugin_entries(root)]
