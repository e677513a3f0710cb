"""The OCI image writer: digests, the manifest/config/index shapes, determinism, archives."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from ciliary.lab import ociimage
from ciliary.lab.ociimage import FileEntry, ImageConfig, LayoutWriter


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(tmp: Path, *, compress: bool = False) -> tuple[Path, ociimage.Descriptor]:
    tar = tmp / "layer.tar"
    ociimage.write_layer_tar([
        FileEntry("/usr/local/bin/hello", data=b"#!/bin/sh\necho hi\n", mode=0o755),
        FileEntry("/etc/motd", data=b"lab\n"),
        FileEntry("/bin/sh", symlink_to="busybox", mode=0o777),
    ], tar)
    writer = LayoutWriter(tmp / "layout")
    layer = writer.add_layer(tar, compress=compress)
    manifest = writer.add_image("lab/app", [layer], ImageConfig(
        entrypoint=["/usr/local/bin/hello"], env={"PATH": "/usr/bin"}, labels={"b": "2", "a": "1"}),
        history=["test layer"])
    return tmp / "layout", manifest


def test_blobs_are_named_by_their_sha256_and_sizes_match(tmp_path: Path) -> None:
    layout, manifest_desc = build(tmp_path)
    blobs = layout / "blobs" / "sha256"
    for blob in blobs.iterdir():
        assert sha(blob.read_bytes()) == "sha256:" + blob.name
    manifest_bytes = ociimage.read_blob(layout, manifest_desc.digest)
    assert len(manifest_bytes) == manifest_desc.size
    manifest = json.loads(manifest_bytes)
    for desc in [manifest["config"], *manifest["layers"]]:
        assert len(ociimage.read_blob(layout, desc["digest"])) == desc["size"]


def test_manifest_config_and_index_have_the_oci_shape(tmp_path: Path) -> None:
    layout, manifest_desc = build(tmp_path)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = ociimage.read_index(layout)
    assert index["schemaVersion"] == 2 and index["mediaType"] == ociimage.MEDIA_INDEX
    (entry,) = index["manifests"]
    assert entry["digest"] == manifest_desc.digest and entry["mediaType"] == ociimage.MEDIA_MANIFEST
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert entry["annotations"] == {ociimage.ANNOTATION_CONTAINERD_NAME: "docker.io/lab/app:latest",
                                    ociimage.ANNOTATION_REF_NAME: "latest"}
    manifest = json.loads(ociimage.read_blob(layout, manifest_desc.digest))
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == ociimage.MEDIA_MANIFEST
    assert manifest["config"]["mediaType"] == ociimage.MEDIA_CONFIG
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == ociimage.MEDIA_LAYER_TAR
    config = json.loads(ociimage.read_blob(layout, manifest["config"]["digest"]))
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}  # uncompressed: diff_id = digest
    assert config["config"] == {"Entrypoint": ["/usr/local/bin/hello"], "Env": ["PATH=/usr/bin"],
                                "Labels": {"a": "1", "b": "2"}}
    assert config["history"] == [{"created": ociimage.CREATED, "created_by": "test layer"}]


def test_gzip_layers_keep_the_uncompressed_digest_as_diff_id(tmp_path: Path) -> None:
    layout, manifest_desc = build(tmp_path, compress=True)
    manifest = json.loads(ociimage.read_blob(layout, manifest_desc.digest))
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == ociimage.MEDIA_LAYER_GZIP
    config = json.loads(ociimage.read_blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [sha((tmp_path / "layer.tar").read_bytes())]
    assert layer["digest"] != config["rootfs"]["diff_ids"][0]


def test_layers_are_deterministic_with_parents_and_root_ownership(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = build(tmp_path / "a")
    _, second = build(tmp_path / "b")
    assert first.digest == second.digest
    with tarfile.open(tmp_path / "a" / "layer.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {"usr", "usr/local", "usr/local/bin", "etc", "bin"} <= set(names)
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == ociimage.SOURCE_EPOCH for m in members)
    hello = next(m for m in members if m.name == "usr/local/bin/hello")
    assert hello.mode == 0o755 and hello.isfile()
    link = next(m for m in members if m.name == "bin/sh")
    assert link.issym() and link.linkname == "busybox"


def test_a_second_image_in_the_same_layout_shares_blobs_and_replaces_its_own_name(tmp_path: Path) -> None:
    layout, _ = build(tmp_path)
    writer = LayoutWriter(layout)
    layer = writer.add_layer(tmp_path / "layer.tar")
    writer.add_image("registry.k8s.io/pause:3.10", [layer], ImageConfig(entrypoint=["/pause"]))
    writer.add_image("lab/app", [layer], ImageConfig(entrypoint=["/other"]))
    names = [m["annotations"][ociimage.ANNOTATION_CONTAINERD_NAME] for m in ociimage.read_index(layout)["manifests"]]
    assert names == ["docker.io/lab/app:latest", "registry.k8s.io/pause:3.10"]


def test_archive_holds_the_layout(tmp_path: Path) -> None:
    layout, manifest_desc = build(tmp_path)
    archive = tmp_path / "image.tar"
    ociimage.write_archive(layout, archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert names[:2] == ["oci-layout", "index.json"]
    assert f"blobs/sha256/{manifest_desc.digest.removeprefix('sha256:')}" in names
    assert index["manifests"][0]["digest"] == manifest_desc.digest


@pytest.mark.parametrize(("name", "full"), [
    ("lab/app", "docker.io/lab/app:latest"),
    ("busybox", "docker.io/library/busybox:latest"),
    ("registry.k8s.io/e2e-test-images/agnhost:2.56", "registry.k8s.io/e2e-test-images/agnhost:2.56"),
    ("localhost:5000/ciliary-agent:dev", "localhost:5000/ciliary-agent:dev"),
    ("lab/app@sha256:" + "0" * 64, "docker.io/lab/app:latest@sha256:" + "0" * 64),
])
def test_full_reference(name: str, full: str) -> None:
    assert ociimage.full_reference(name) == full


@pytest.mark.parametrize("bad", ["", "Lab/App", "lab/app with space"])
def test_full_reference_refuses_bad_names(bad: str) -> None:
    with pytest.raises(ociimage.ImageWriteError):
        ociimage.full_reference(bad)


def test_layer_paths_must_not_escape(tmp_path: Path) -> None:
    with pytest.raises(ociimage.ImageWriteError):
        ociimage.write_layer_tar([FileEntry("../etc/passwd", data=b"")], tmp_path / "x.tar")


def test_tree_entries_keep_modes_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "run.sh").write_text("#!/bin/sh\n")
    (src / "pkg" / "run.sh").chmod(0o750)
    (src / "link").symlink_to("pkg/run.sh")
    entries = {e.path: e for e in ociimage.tree_entries(src, "/opt/x")}
    assert entries["/opt/x/pkg/run.sh"].mode == 0o750
    assert entries["/opt/x/link"].symlink_to == "pkg/run.sh"
    assert entries["/opt/x/pkg"].directory
