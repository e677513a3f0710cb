"""Every external executable the lab and the test suite run: which set-up step provides it, and where it is.

Two kinds of tools:

- the Go-built control plane and helm (kube-apiserver, kube-controller-manager,
  kubectl, etcd, etcdctl, helm, and cyclonus, the NetworkPolicy reference): pinned in ``setup/versions.env`` and cached by
  ``setup/build-go-tools.sh`` under ``$CILIARY_CACHE/bin/<group>-<version>/``
  (``CILIARY_CACHE`` defaults to ``/var/cache/ciliary``); the real-node tools (containerd, ctr,
  kubelet, kube-scheduler, kube-proxy, agnhost, registry, e2e.test, skaffold) likewise, cached by
  ``setup/build-node-tools.sh``; the hubble CLI by ``setup/build-hubble.sh``;
- Debian tools (ip, tc, nsenter, bpftool, iptables, openssl, ...): installed by
  ``setup/setup.sh`` and found on ``PATH``.

``setup/versions.env`` is the one place versions live: this module reads it
(``CILIARY_VERSIONS_FILE`` names another copy, e.g. in an installed tree) and
nothing else copies a version. :func:`find` returns a tool's path or raises
:class:`ToolMissingError` naming the tool, where it was looked for and the set-up
step that provides it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

VERSIONS_RELPATH = Path("setup") / "versions.env"

# tool -> (cache group, versions.env key): $CILIARY_CACHE/bin/<group>-<version>/<tool>
BUILT_TOOLS: dict[str, tuple[str, str]] = {
    "kube-apiserver": ("kubernetes", "KUBERNETES_VERSION"),
    "kube-controller-manager": ("kubernetes", "KUBERNETES_VERSION"),
    "kubectl": ("kubernetes", "KUBERNETES_VERSION"),
    "etcd": ("etcd", "ETCD_VERSION"),
    "etcdctl": ("etcd", "ETCD_VERSION"),
    "helm": ("helm", "HELM_VERSION"),
    "cyclonus": ("cyclonus", "CYCLONUS_VERSION"),
    # real nodes (setup/build-node-tools.sh)
    "containerd": ("containerd", "CONTAINERD_VERSION"),
    "containerd-shim-runc-v2": ("containerd", "CONTAINERD_VERSION"),
    "ctr": ("containerd", "CONTAINERD_VERSION"),
    "kubelet": ("kubernetes-node", "KUBERNETES_VERSION"),
    "kube-scheduler": ("kubernetes-node", "KUBERNETES_VERSION"),
    "kube-proxy": ("kubernetes-node", "KUBERNETES_VERSION"),
    "agnhost": ("kubernetes-node", "KUBERNETES_VERSION"),
    "registry": ("registry", "REGISTRY_VERSION"),
    "e2e.test": ("kubernetes-e2e", "KUBERNETES_VERSION"),
    "skaffold": ("skaffold", "SKAFFOLD_VERSION"),
    # the Hubble CLI, the Observer API's test client (setup/build-hubble.sh)
    "hubble": ("hubble", "HUBBLE_VERSION"),
    "coredns": ("coredns", "COREDNS_VERSION"),
}
NODE_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "kubelet", "kube-scheduler", "kube-proxy", "agnhost",
              "registry", "e2e.test", "skaffold", "coredns")

# tool -> the Debian package setup/setup.sh installs it with
SYSTEM_TOOLS: dict[str, str] = {
    "ip": "iproute2",
    "tc": "iproute2",
    "nsenter": "util-linux",
    "mount": "mount",
    "sysctl": "procps",
    "bpftool": "bpftool",
    "iptables": "iptables",
    "iptables-restore": "iptables",
    "nft": "nftables",  # kube-proxy in nftables mode (`ciliary lab up --kube-proxy nftables`)
    "openssl": "openssl",
    "ping": "iputils-ping",
    "runc": "runc",
    "mmdebstrap": "mmdebstrap",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "chromium": "chromium",  # the service map's browser test (driven by playwright)
}


class VersionsFileError(RuntimeError):
    """``setup/versions.env`` cannot be found or lacks a key."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class ToolMissingError(RuntimeError):
    """A tool is not where the set-up puts it; the message names the tool and the set-up step."""

    def __init__(self, tool: str, looked_at: str, setup_step: str) -> None:
        super().__init__(f"{tool} is missing (looked for {looked_at}): {setup_step}")
        self.tool = tool
        self.looked_at = looked_at
        self.setup_step = setup_step


def parse_versions(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a versions.env (comments, blank lines and quotes ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip("'\"")
    return out


def versions_file() -> Path:
    """``$CILIARY_VERSIONS_FILE``, else ``setup/versions.env`` above this module or the working directory."""
    env = os.environ.get("CILIARY_VERSIONS_FILE")
    if env:
        return Path(env)
    here, cwd = Path(__file__).resolve(), Path.cwd().resolve()
    for base in [*here.parents, cwd, *cwd.parents]:
        candidate = base / VERSIONS_RELPATH
        if candidate.is_file():
            return candidate
    raise VersionsFileError(f"{VERSIONS_RELPATH} not found above {here.parent} or {cwd}: run from the "
                            "repository or set CILIARY_VERSIONS_FILE")


def pinned_versions(path: Path | None = None) -> dict[str, str]:
    path = path or versions_file()
    try:
        return parse_versions(path.read_text())
    except OSError as exc:
        raise VersionsFileError(f"cannot read {path}: {exc}", path) from exc


def pinned_version(key: str, path: Path | None = None) -> str:
    versions = pinned_versions(path)
    if key not in versions:
        raise VersionsFileError(f"{key} is not set in {path or versions_file()}", path)
    return versions[key]


def cache_dir() -> Path:
    return Path(os.environ.get("CILIARY_CACHE", "/var/cache/ciliary"))


def built_path(tool: str, versions: dict[str, str] | None = None) -> Path:
    """Where ``setup/build-go-tools.sh`` puts ``tool`` (whether or not it is there)."""
    group, key = BUILT_TOOLS[tool]
    version = (versions or pinned_versions()).get(key)
    if version is None:
        raise VersionsFileError(f"{key} is not set in {versions_file()}")
    return cache_dir() / "bin" / f"{group}-{version}" / tool


def setup_step(tool: str) -> str:
    if tool == "hubble":
        return "setup/build-hubble.sh builds it (run setup/setup.sh, or `make setup`)"
    if tool in NODE_TOOLS:
        return "setup/build-node-tools.sh builds it (run setup/setup.sh, or `make setup`)"
    if tool in BUILT_TOOLS:
        return "setup/build-go-tools.sh builds it (run setup/setup.sh, or `make setup`)"
    if tool in SYSTEM_TOOLS:
        return f"setup/setup.sh installs the Debian package {SYSTEM_TOOLS[tool]} (run `make setup` as root)"
    return "no set-up step provides it: add it to ciliary.lab.tools and setup/setup.sh"


def find(tool: str) -> Path:
    """The executable ``tool``; :class:`ToolMissingError` when the set-up did not provide it."""
    if tool in BUILT_TOOLS:
        path = built_path(tool)
        if not os.access(path, os.X_OK):
            raise ToolMissingError(tool, str(path), setup_step(tool))
        return path
    found = shutil.which(tool)
    if found is None:
        raise ToolMissingError(tool, "PATH", setup_step(tool))
    return Path(found)


def missing(tools: Iterable[str]) -> list[ToolMissingError]:
    """One error per tool of ``tools`` that :func:`find` cannot find."""
    errors = []
    for tool in tools:
        try:
            find(tool)
        except ToolMissingError as exc:
            errors.append(exc)
    return errors

