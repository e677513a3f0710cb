"""The binaries real lab nodes run, as ``setup/build-node-tools.sh`` cached them (paths from ``tools``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import tools


class NodeBinariesMissingError(RuntimeError):
    """A binary real nodes need was not built; carries the paths."""

    def __init__(self, missing: list[Path]) -> None:
        super().__init__("real-node binaries missing: " + ", ".join(map(str, missing))
                         + " — run setup/setup.sh (setup/build-node-tools.sh builds them)")
        self.missing = missing


def cache_dir() -> Path:
    return tools.cache_dir()


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
    coredns: Path
    runc: Path

    @classmethod
    def discover(cls, pinned: dict[str, str] | None = None) -> NodeBinaries:
        v = pinned or tools.pinned_versions()

        def built(tool: str) -> Path:
            return tools.built_path(tool, v)

        try:
            runc = tools.find("runc")
        except tools.ToolMissingError:
            runc = Path("/usr/sbin/runc")  # reported by missing()
        return cls(
            containerd=built("containerd"), containerd_shim=built("containerd-shim-runc-v2"), ctr=built("ctr"),
            kubelet=built("kubelet"), kube_scheduler=built("kube-scheduler"), kube_proxy=built("kube-proxy"),
            agnhost=built("agnhost"), registry=built("registry"), coredns=built("coredns"), runc=runc,
        )

    def missing(self, *only: str) -> list[Path]:
        """The binaries not built yet (of the fields ``only`` names, or all)."""
        return [p for name, p in vars(self).items() if (not only or name in only) and not os.access(p, os.X_OK)]

    def require(self, *only: str) -> NodeBinaries:
        """Self when every binary (of the fields ``only`` names, or all) is there; else the error naming them."""
        missing = self.missing(*only)
        if missing:
            raise NodeBinariesMissingError(missing)
        return self
