"""The binaries real lab nodes run, as ``setup/build-node-tools.sh`` cached them, and their versions.

Versions come from ``setup/versions.env`` (the one place they are pinned), found through
``CILIARY_VERSIONS_FILE`` or by walking up from the current directory to the repository.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


class NodeBinariesMissingError(RuntimeError):
    """A binary real nodes need was not built; carries the paths."""

    def __init__(self, missing: list[Path]) -> None:
        super().__init__("real-node binaries missing: " + ", ".join(map(str, missing))
                         + " — run setup/setup.sh (setup/build-node-tools.sh builds them)")
        self.missing = missing


def cache_dir() -> Path:
    return Path(os.environ.get("CILIARY_CACHE", "/var/cache/ciliary"))


def parse_versions(text: str) -> dict[str, str]:
    """``KEY=value`` lines of versions.env (comments and blanks ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("'\"")
    return out


def versions_file() -> Path:
    env = os.environ.get("CILIARY_VERSIONS_FILE")
    if env:
        return Path(env)
    for base in [Path.cwd(), *Path.cwd().parents]:
        candidate = base / "setup" / "versions.env"
        if candidate.exists() and (base / "pyproject.toml").exists():
            return candidate
    raise FileNotFoundError("setup/versions.env not found: run from the repository or set CILIARY_VERSIONS_FILE")


def versions() -> dict[str, str]:
    return parse_versions(versions_file().read_text())


@dataclass(frozen=True)
class NodeBinaries:
    containerd: Path
    containerd_shim: Path
    ctr: Path
    kubelet: Path
    kube_scheduler: Path
    kube_proxy: Path
    agnhost: Path
    registry: Path
    runc: Path

    @classmethod
    def discover(cls, pinned: dict[str, str] | None = None) -> NodeBinaries:
        v = pinned or versions()
        b = cache_dir() / "bin"
        containerd = b / f"containerd-{v['CONTAINERD_VERSION']}"
        kube = b / f"kubernetes-node-{v['KUBERNETES_VERSION']}"
        return cls(
            containerd=containerd / "containerd", containerd_shim=containerd / "containerd-shim-runc-v2",
            ctr=containerd / "ctr", kubelet=kube / "kubelet", kube_scheduler=kube / "kube-scheduler",
            kube_proxy=kube / "kube-proxy", agnhost=kube / "agnhost",
            registry=b / f"registry-{v['REGISTRY_VERSION']}" / "registry",
            runc=Path(shutil.which("runc") or "/usr/sbin/runc"),
        )

    def missing(self) -> list[Path]:
        return [p for p in vars(self).values() if not os.access(p, os.X_OK)]

    def require(self) -> NodeBinaries:
        missing = self.missing()
        if missing:
            raise NodeBinariesMissingError(missing)
        return self
