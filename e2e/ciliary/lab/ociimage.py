"""A small OCI image writer: layers as tars, an image config, a manifest and an index.

It writes an OCI image-layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/…``) and,
from it, an ``oci-archive`` tar that ``ctr images import`` (and skopeo, podman, a registry push)
accept. No docker, no daemon, no registry: the lab builds its images with this module.

Everything is deterministic: file entries are sorted, owned by root, dated ``SOURCE_EPOCH``; the
same inputs give the same digests, which is what the image cache keys on.

Pure apart from reading and writing the files it is given; no subprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

SOURCE_EPOCH = 0
CREATED = "1970-01-01T00:00:00Z"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
#: containerd names an imported image after this annotation (the full reference)
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
_CHUNK = 1 << 20


class ImageWriteError(ValueError):
    """An image could not be written as asked; carries the offending reference or path."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size."""

    media_type: str
    digest: str
    size: int

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class FileEntry:
    """One entry of a layer: a regular file (``data`` or ``source``), a directory or a symlink."""

    path: str
    data: bytes | None = None
    source: Path | None = None
    mode: int = 0o644
    directory: bool = False
    symlink_to: str | None = None


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (what ``docker inspect`` shows as Config)."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.entrypoint:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.env:
            out["Env"] = [f"{k}={v}" for k, v in self.env.items()]
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.user:
            out["User"] = self.user
        if self.labels:
            out["Labels"] = dict(sorted(self.labels.items()))
        return out


@dataclass(frozen=True)
class Layer:
    """A layer blob in a layout: its descriptor and the digest of its uncompressed tar (diff_id)."""

    descriptor: Descriptor
    diff_id: str


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def full_reference(name: str) -> str:
    """``lab/app`` → ``docker.io/lab/app:latest``: containerd resolves pod images fully qualified."""
    repo, _, digest = name.partition("@")
    path, _, tag = repo.rpartition(":") if ":" in repo.rsplit("/", 1)[-1] else (repo, "", "")
    if not path or any(c.isspace() for c in name) or path != path.lower():
        raise ImageWriteError(name, "an image reference has a lower-case repository and no spaces")
    repo = f"{path}:{tag or 'latest'}"
    first = repo.split("/", 1)[0]
    if "/" not in repo or not ("." in first or ":" in first or first == "localhost"):
        repo = "docker.io/" + (repo if "/" in repo else "library/" + repo)
    return repo + (f"@{digest}" if digest else "")


def tag_of(reference: str) -> str:
    last = reference.split("@")[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _parents(path: PurePosixPath) -> list[PurePosixPath]:
    return [p for p in reversed(path.parents) if str(p) not in (".", "/", "")]


def write_layer_tar(entries: Iterable[FileEntry], out: Path) -> None:
    """A deterministic tar of ``entries`` (parent directories added, sorted, root-owned, epoch-dated)."""
    by_path: dict[str, FileEntry] = {}
    for e in entries:
        path = PurePosixPath(e.path.lstrip("/"))
        if not str(path) or str(path) == "." or ".." in path.parts:
            raise ImageWriteError(e.path, "layer paths are absolute or relative paths without '..'")
        for parent in _parents(path):
            by_path.setdefault(str(parent), FileEntry(str(parent), directory=True, mode=0o755))
        by_path[str(path)] = e
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(by_path):
            e = by_path[name]
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = SOURCE_EPOCH, 0, 0, "", ""
            info.mode = e.mode
            if e.directory:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.symlink_to is not None:
                info.type, info.linkname = tarfile.SYMTYPE, e.symlink_to
                tar.addfile(info)
            elif e.source is not None:
                info.size = e.source.stat().st_size
                with open(e.source, "rb") as f:
                    tar.addfile(info, f)
            else:
                data = e.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tree_entries(root: Path, prefix: str) -> list[FileEntry]:
    """Every file, directory and symlink under ``root``, placed under ``prefix`` in the layer."""
    entries = [FileEntry(prefix, directory=True, mode=0o755)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            rel = f"{prefix.rstrip('/')}/{p.relative_to(root).as_posix()}"
            st = p.lstat()
            if p.is_symlink():
                entries.append(FileEntry(rel, symlink_to=os.readlink(p), mode=0o777))
            elif p.is_dir():
                entries.append(FileEntry(rel, directory=True, mode=st.st_mode & 0o7777))
            elif p.is_file():
                entries.append(FileEntry(rel, source=p, mode=st.st_mode & 0o7777))
    return entries


class LayoutWriter:
    """Builds one OCI image-layout directory; blobs are content-addressed and written once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def _blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def add_bytes(self, media_type: str, data: bytes) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Descriptor(media_type, digest, len(data))

    def add_json(self, media_type: str, document: Mapping[str, Any]) -> Descriptor:
        return self.add_bytes(media_type, canonical_json(document))

    def add_layer(self, tar_path: Path, *, compress: bool = False) -> Layer:
        """Add an uncompressed layer tar: linked (or copied) into the layout as is, or gzipped."""
        diff_id = _sha256_file(tar_path)
        if not compress:
            target = self._blob_path(diff_id)
            if not target.exists():
                try:  # same file system: share the bytes (blobs are never modified in place)
                    os.link(tar_path, target)
                except OSError:
                    shutil.copyfile(tar_path, target.with_suffix(".tmp"))
                    target.with_suffix(".tmp").replace(target)
            return Layer(Descriptor(MEDIA_LAYER_TAR, diff_id, target.stat().st_size), diff_id)
        tmp = self.blobs / f"{diff_id.removeprefix('sha256:')}.gz.tmp"
        with open(tar_path, "rb") as src, open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=SOURCE_EPOCH) as gz:
                shutil.copyfileobj(src, gz, _CHUNK)
        digest = _sha256_file(tmp)
        target = self._blob_path(digest)
        tmp.replace(target)
        return Layer(Descriptor(MEDIA_LAYER_GZIP, digest, target.stat().st_size), diff_id)

    def add_image(self, reference: str, layers: Sequence[Layer], config: ImageConfig,
                  *, history: Sequence[str] = ()) -> Descriptor:
        """Write the config and manifest, and list the image in ``index.json`` under ``reference``."""
        full = full_reference(reference)
        config_doc = {
            "created": CREATED, "architecture": "amd64", "os": "linux", "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": CREATED, "created_by": h} for h in history],
        }
        config_desc = self.add_json(MEDIA_CONFIG, config_doc)
        manifest = {
            "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc.to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
        manifest_desc = self.add_json(MEDIA_MANIFEST, manifest)
        self._index_add(manifest_desc, full)
        return manifest_desc

    def _index_add(self, manifest: Descriptor, full: str) -> None:
        index_path = self.root / "index.json"
        index: dict[str, Any] = (json.loads(index_path.read_text()) if index_path.exists()
                                 else {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []})
        entries = [m for m in index["manifests"]
                   if m.get("annotations", {}).get(ANNOTATION_CONTAINERD_NAME) != full]
        entries.append(manifest.to_json(
            platform={"architecture": "amd64", "os": "linux"},
            annotations={ANNOTATION_CONTAINERD_NAME: full, ANNOTATION_REF_NAME: tag_of(full)}))
        index["manifests"] = sorted(entries, key=lambda m: m["annotations"][ANNOTATION_CONTAINERD_NAME])
        index_path.write_bytes(canonical_json(index))


def write_archive(layout_dir: Path, out: Path) -> None:
    """An ``oci-archive``: the layout directory as one deterministic tar."""
    names = ["oci-layout", "index.json", "blobs", "blobs/sha256",
             *(f"blobs/sha256/{p.name}" for p in sorted((layout_dir / "blobs" / "sha256").iterdir())
               if not p.name.endswith(".tmp"))]
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = layout_dir / name
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = SOURCE_EPOCH, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_dir():
                tar.addfile(info)
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    tmp.replace(out)


def read_index(layout_dir: Path) -> dict[str, Any]:
    data = json.loads((layout_dir / "index.json").read_text())
    if not isinstance(data, dict):
        raise ImageWriteError(str(layout_dir), "index.json is not an object")
    return data


def read_blob(layout_dir: Path, digest: str) -> bytes:
    return (layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
