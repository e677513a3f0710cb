"""ciliary.lab.tools: one place resolves every tool, from setup/versions.env and CILIARY_CACHE."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ciliary.lab import tools
from ciliary.lab.layout import Binaries

ROOT = Path(__file__).resolve().parents[3]
VERSIONS = ROOT / "setup" / "versions.env"
# files that may name a pinned version besides versions.env: prose, and the Go modules the set-up builds
# from (their go.mod must agree with versions.env: test_go_modules_build_the_pinned_versions)
MAY_NAME_VERSIONS = {".md"}
SKIP_DIRS = {".git", ".venv", "build", "go", "__pycache__", ".lab"}


def test_parse_versions() -> None:
    text = "# pinned\nKUBERNETES_VERSION=v1.2.3\n\n ETCD_VERSION = 'v3.0.0' \nnot a line\n"
    assert tools.parse_versions(text) == {"KUBERNETES_VERSION": "v1.2.3", "ETCD_VERSION": "v3.0.0"}


def test_the_repository_pins_every_built_tool() -> None:
    pinned = tools.pinned_versions()
    assert tools.versions_file().resolve() == VERSIONS.resolve()
    assert {key for _, key in tools.BUILT_TOOLS.values()} <= set(pinned)
    assert all(re.fullmatch(r"v\d+\.\d+\.\d+", pinned[key]) for _, key in tools.BUILT_TOOLS.values())


def test_built_tools_live_in_the_cache_under_the_pinned_version(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    versions = tmp_path / "versions.env"
    versions.write_text("KUBERNETES_VERSION=v9.8.7\nETCD_VERSION=v6.5.4\nHELM_VERSION=v3.2.1\n")
    monkeypatch.setenv("CILIARY_VERSIONS_FILE", str(versions))
    monkeypatch.setenv("CILIARY_CACHE", str(tmp_path / "cache"))
    assert tools.built_path("kubectl") == tmp_path / "cache" / "bin" / "kubernetes-v9.8.7" / "kubectl"
    assert tools.built_path("etcdctl") == tmp_path / "cache" / "bin" / "etcd-v6.5.4" / "etcdctl"
    assert tools.built_path("helm") == tmp_path / "cache" / "bin" / "helm-v3.2.1" / "helm"
    bins = Binaries.discover()
    assert bins.kube_apiserver == tmp_path / "cache" / "bin" / "kubernetes-v9.8.7" / "kube-apiserver"
    assert bins.etcd == tmp_path / "cache" / "bin" / "etcd-v6.5.4" / "etcd"
    assert len(bins.missing()) == 5

    with pytest.raises(tools.ToolMissingError) as err:
        tools.find("etcd")
    assert err.value.tool == "etcd"
    assert str(err.value) == (f"etcd is missing (looked for {tmp_path}/cache/bin/etcd-v6.5.4/etcd): "
                              "setup/build-go-tools.sh builds it (run setup/setup.sh, or `make setup`)")
    helm = tools.built_path("helm")
    helm.parent.mkdir(parents=True)
    helm.write_text("#!/bin/sh\n")
    helm.chmod(0o755)
    assert tools.find("helm") == helm
    assert [e.tool for e in tools.missing(["helm", "etcd"])] == ["etcd"]


def test_a_missing_key_or_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    versions = tmp_path / "versions.env"
    versions.write_text("ETCD_VERSION=v3.0.0\n")
    monkeypatch.setenv("CILIARY_VERSIONS_FILE", str(versions))
    with pytest.raises(tools.VersionsFileError, match="KUBERNETES_VERSION is not set"):
        tools.built_path("kubectl")
    monkeypatch.setenv("CILIARY_VERSIONS_FILE", str(tmp_path / "absent.env"))
    with pytest.raises(tools.VersionsFileError, match="cannot read"):
        tools.pinned_versions()


def test_system_tools_come_from_path_and_name_their_debian_package(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tools.ToolMissingError, match=r"^bpftool is missing \(looked for PATH\): setup/setup.sh "
                                                     r"installs the Debian package bpftool"):
        tools.find("bpftool")
    (tmp_path / "ip").write_text("#!/bin/sh\n")
    (tmp_path / "ip").chmod(0o755)
    assert tools.find("ip") == tmp_path / "ip"
    assert "no set-up step provides it" in tools.setup_step("frobnicate")


def test_setup_installs_every_system_tool_package() -> None:
    setup = (ROOT / "setup" / "setup.sh").read_text()
    packages = re.search(r"APT_PACKAGES=\(([^)]*)\)", setup)
    assert packages is not None
    assert set(tools.SYSTEM_TOOLS.values()) - {"mount"} <= set(packages.group(1).split())


def test_go_modules_build_the_pinned_versions() -> None:
    pinned = tools.pinned_versions()
    kube = (ROOT / "setup" / "go" / "kubernetes" / "go.mod").read_text()
    etcd = (ROOT / "setup" / "go" / "etcd" / "go.mod").read_text()
    assert re.search(rf"^\s*k8s\.io/kubernetes {re.escape(pinned['KUBERNETES_VERSION'])}\b", kube, re.M)
    assert re.search(rf"^\s*go\.etcd\.io/etcd/server/v3 {re.escape(pinned['ETCD_VERSION'])}\b", etcd, re.M)


def test_no_code_copies_a_pinned_version() -> None:
    pinned = set(tools.pinned_versions().values())
    offenders = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".lab")
                       and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path == VERSIONS or path.suffix in MAY_NAME_VERSIONS or path.suffix in {".pyc", ".sum"}:
                continue
            try:
                text = path.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            offenders += [f"{path.relative_to(ROOT)}: {v}" for v in pinned if v in text or v[1:] in text]
    assert offenders == [], "versions live in setup/versions.env only"
