"""The lab's container images, built without docker and cached by content.

Base layers are Debian root filesystems made by ``mmdebstrap --variant=minbase`` from Debian's
packages (one tar per package set); the rest are small layers written by ``ciliary.lab.ociimage``.
Each image is an OCI layout plus an ``oci-archive`` under ``$CILIARY_CACHE/images``, named by a key
over everything that goes in (package set and suite, binaries' digests, sources, config), so a
second build returns at once and a changed input builds a new image.

Images (names as the pods and upstream e2e suites use them):
- ``registry.k8s.io/pause:3.10.1``: the sandbox image; agnhost alone, running ``agnhost pause``;
- ``registry.k8s.io/e2e-test-images/agnhost:2.56``: agnhost and ``/coredns`` on Debian with curl, wget, dig,
  ip, nc, conntrack (the upstream suites exec them in agnhost pods, e.g. ``wget`` to count a Service's
  backends, ``/coredns`` as a pod's own DNS server);
- ``registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7``: the upstream DNS specs' second querier (they run
  ``sh -c`` with dig, getent, hostname, awk in it): the same Debian root filesystem as agnhost;
- ``docker.io/lab/app:latest``: the lab's per-pod test servers (``ciliary.lab.podserver``) on
  Debian's python3.

``python -m ciliary.lab.images build`` builds them all, and the project's operator and agent images
(``ciliary.lab.projectimages``); the set-up runs it. ``import`` loads them into a containerd
(``--address``) through ``ctr``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ciliary.lab import ociimage, podserver, tools
from ciliary.lab.nodebins import NodeBinaries, cache_dir
from ciliary.lab.nodeconfig import SANDBOX_IMAGE
from ciliary.lab.ociimage import FileEntry, ImageConfig, LayoutWriter

AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.56"
DNSUTILS_IMAGE = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7"
APP_IMAGE = "docker.io/lab/app:latest"
DEBIAN_MIRROR = os.environ.get("CILIARY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("CILIARY_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
#: documentation, manual pages and translations are left out of every root filesystem
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*")
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: builds of one image reference kept in the cache (each archive is a full copy, up to 1.1 GB)
KEPT_BUILDS = 3


class ImageBuildError(RuntimeError):
    """Building or importing an image failed; carries the image (or root filesystem) name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@dataclass(frozen=True)
class RootfsSpec:
    """A Debian root filesystem: suite and the packages on top of minbase."""

    name: str
    suite: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = ()  # mmdebstrap --customize-hook commands
    inputs: tuple[str, ...] = ()  # digests of what the hooks copy in (part of the key)

    def key(self) -> str:
        doc = {k: v for k, v in asdict(self).items() if v != ()}  # (empty hooks/inputs leave keys as they were)
        doc.update(mirrors=[DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR], excludes=DPKG_EXCLUDES)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BuiltImage:
    reference: str
    layout: Path
    archive: Path


def parse_codename(os_release: str) -> str | None:
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip().strip('"'):
            return value.strip().strip('"')
    return None


def debian_suite() -> str:
    """The host's Debian suite (``CILIARY_DEBIAN_SUITE`` overrides): images carry the host's python3,
    for which the wheelhouse is built, so base images follow the host rather than a pin."""
    override = os.environ.get("CILIARY_DEBIAN_SUITE")
    if override:
        return override
    suite = parse_codename(Path("/etc/os-release").read_text())
    if suite is None:
        raise ImageBuildError("/etc/os-release", "no VERSION_CODENAME: set CILIARY_DEBIAN_SUITE")
    return suite


def images_dir() -> Path:
    return cache_dir() / "images"


def sources_lines(suite: str) -> list[str]:
    return [f"deb {DEBIAN_MIRROR} {suite} main", f"deb {DEBIAN_MIRROR} {suite}-updates main",
            f"deb {DEBIAN_SECURITY_MIRROR} {suite}-security main"]


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Held while ``target`` is built: the cache is shared by every checkout and session on the machine,
    and two builds of one key must not write the same files (the holder's builds are bounded)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_rootfs(spec: RootfsSpec, *, log: bool = True) -> Path:
    """``<cache>/images/rootfs/<name>-<key>.tar``, made by mmdebstrap once."""
    out = images_dir() / "rootfs" / f"{spec.name}-{spec.key()}.tar"
    if out.exists():
        return out
    with build_lock(out):
        return out if out.exists() else _mmdebstrap(spec, out, log=log)


def _mmdebstrap(spec: RootfsSpec, out: Path, *, log: bool) -> Path:
    if not shutil.which("mmdebstrap"):
        raise ImageBuildError(spec.name, "mmdebstrap is not installed (setup/setup.sh installs it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tar")
    # device nodes stay out of the layer (the runtime mounts /dev); documentation too
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--skip=output/dev",
            *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
            "--aptopt=Acquire::Retries \"3\"",
            *([f"--include={','.join(spec.packages)}"] if spec.packages else []),
            *(f"--customize-hook={hook}" for hook in spec.hooks),
            spec.suite, str(tmp), *sources_lines(spec.suite)]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(spec.name, f"mmdebstrap failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tmp.replace(out)
    if log:
        print(f"[images] root filesystem {spec.name} ({out.stat().st_size >> 20} MiB) in {time.monotonic() - t0:.0f} s")
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _slug(reference: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in reference.split("/", 1)[-1])


def image_root(reference: str, key_parts: Sequence[str], config: ImageConfig) -> Path:
    key = hashlib.sha256(json.dumps([reference, list(key_parts), config.to_json()], sort_keys=True)
                         .encode()).hexdigest()[:16]
    return images_dir() / "oci" / f"{_slug(reference)}-{key}"


def cached(reference: str, key_parts: Sequence[str], config: ImageConfig) -> BuiltImage | None:
    root = image_root(reference, key_parts, config)
    return BuiltImage(reference, root / "layout", root / "image.tar") if (root / "image.tar").exists() else None


def assemble(reference: str, base: Path | None, files: Sequence[FileEntry], config: ImageConfig,
             *, key_parts: Sequence[str], history: Sequence[str]) -> BuiltImage:
    """Base tar (optional) + one layer of ``files``; cached under a key over ``key_parts`` and config."""
    hit = cached(reference, key_parts, config)
    if hit:
        return hit
    root = image_root(reference, key_parts, config)
    with build_lock(root):
        hit = cached(reference, key_parts, config)
        return hit if hit else _assemble(root, reference, base, files, config, history)


def _assemble(root: Path, reference: str, base: Path | None, files: Sequence[FileEntry], config: ImageConfig,
              history: Sequence[str]) -> BuiltImage:
    archive = root / "image.tar"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    writer = LayoutWriter(root / "layout")
    layers = [writer.add_layer(base)] if base else []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        top = Path(tmp) / "top.tar"
        ociimage.write_layer_tar(files, top)
        layers.append(writer.add_layer(top))
    writer.add_image(reference, layers, config, history=history)
    ociimage.write_archive(root / "layout", archive)
    # an archive holds a full copy of its base layer: the newest few builds per reference are kept (not
    # only the newest, as another checkout or session may be importing the one before)
    builds = [b for b in root.parent.glob(f"{_slug(reference)}-*") if b.is_dir() and len(b.name) == len(root.name)]
    for older in sorted(builds, key=lambda b: b.stat().st_mtime, reverse=True)[KEPT_BUILDS:]:
        if older != root:
            shutil.rmtree(older, ignore_errors=True)
    return BuiltImage(reference, root / "layout", archive)


AGNHOST_ROOTFS = ("ca-certificates", "conntrack", "curl", "dnsutils", "iproute2", "netcat-openbsd", "procps", "wget")
APP_ROOTFS = ("python3",)


def pause_image(bins: NodeBinaries) -> BuiltImage:
    return assemble(SANDBOX_IMAGE, None, [FileEntry("/agnhost", source=bins.agnhost, mode=0o755)],
                    ImageConfig(entrypoint=["/agnhost", "pause"]),
                    key_parts=[file_digest(bins.agnhost)], history=["agnhost (built from k8s.io/kubernetes)"])


def agnhost_image(bins: NodeBinaries, suite: str) -> BuiltImage:
    spec = RootfsSpec("debian-agnhost", suite, AGNHOST_ROOTFS)
    base = build_rootfs(spec)
    # upstream's agnhost image also carries /coredns (the DNS specs run their own server from it)
    return assemble(AGNHOST_IMAGE, base, [FileEntry("/agnhost", source=bins.agnhost, mode=0o755),
                                          FileEntry("/coredns", source=bins.coredns, mode=0o755)],
                    ImageConfig(entrypoint=["/agnhost"], cmd=["pause"], env={"PATH": PATH_ENV}),
                    key_parts=[spec.key(), file_digest(bins.agnhost), file_digest(bins.coredns)],
                    history=[f"mmdebstrap minbase {suite} + {' '.join(spec.packages)}", "agnhost, coredns"])


def dnsutils_image(suite: str) -> BuiltImage:
    """Debian with dig and getent under the name the upstream DNS specs use (upstream: Debian jessie)."""
    spec = RootfsSpec("debian-agnhost", suite, AGNHOST_ROOTFS)
    base = build_rootfs(spec)
    return assemble(DNSUTILS_IMAGE, base, [], ImageConfig(cmd=["sleep", "infinity"], env={"PATH": PATH_ENV}),
                    key_parts=[spec.key()], history=[f"mmdebstrap minbase {suite} + {' '.join(spec.packages)}"])


def app_image(suite: str) -> BuiltImage:
    spec = RootfsSpec("debian-python3", suite, APP_ROOTFS)
    base = build_rootfs(spec)
    server = Path(podserver.__file__)
    return assemble(APP_IMAGE, base, [FileEntry("/opt/ciliary-lab/podserver.py", source=server, mode=0o644)],
                    ImageConfig(entrypoint=["python3", "/opt/ciliary-lab/podserver.py"],
                                env={"PATH": PATH_ENV, "PYTHONUNBUFFERED": "1"}),
                    key_parts=[spec.key(), file_digest(server)],
                    history=[f"mmdebstrap minbase {suite} + python3", "ciliary.lab.podserver"])


def build_all(*, log: bool = True) -> list[BuiltImage]:
    bins = NodeBinaries.discover().require("agnhost", "coredns")  # what the images hold (set-up builds them first)
    suite = debian_suite()
    built = []
    for make in (lambda: pause_image(bins), lambda: agnhost_image(bins, suite), lambda: dnsutils_image(suite),
                 lambda: app_image(suite)):
        t0 = time.monotonic()
        image = make()
        built.append(image)
        if log:
            print(f"[images] {image.reference}: {image.archive} ({time.monotonic() - t0:.1f} s)")
    return built


def import_image(ctr: Path, address: Path, image: BuiltImage) -> None:
    """Load ``image`` into the containerd at ``address`` (namespace k8s.io, unpacked)."""
    proc = subprocess.run([str(ctr), "--address", str(address), "--namespace", "k8s.io", "images", "import",
                           "--platform", "linux/amd64", str(image.archive)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ImageBuildError(image.reference, f"ctr images import failed: {proc.stderr.strip()[-2000:]}")


def list_images(ctr: Path, address: Path) -> list[str]:
    proc = subprocess.run([str(ctr), "--address", str(address), "--namespace", "k8s.io", "images", "list", "-q"],
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.split()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.images", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build every lab image and the project's images (cached by content)")
    imp = sub.add_parser("import", help="build, then import every image into a containerd")
    imp.add_argument("--address", required=True, type=Path, help="containerd socket")
    for p in (build, imp):
        p.add_argument("--no-project", action="store_true", help="only the lab's images, not operator/agent")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    built = build_all()
    if not args.no_project:
        # imported here: projectimages builds on this module (and reads the repository)
        from ciliary.lab import projectimages

        for image in projectimages.project_images(tools.versions_file().resolve().parents[1], debian_suite()):
            print(f"[images] {image.reference}: {image.archive}")
            built.append(image)
    if args.command == "import":
        ctr = NodeBinaries.discover().ctr
        for image in built:
            import_image(ctr, args.address, image)
    print(f"[images] {len(built)} images ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
