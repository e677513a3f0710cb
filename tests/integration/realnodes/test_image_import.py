"""Images written by ciliary.lab.ociimage load into a real containerd and run under runc.

A throwaway containerd (the set-up's build) runs with its root, state and socket in a temporary
directory and without its CRI plugin; ``ctr images import`` loads the archives, and the app image
runs its python3 to prove the layers unpacked into a working root filesystem. Everything (process,
mounts, cgroup, directories) is removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliary.lab import images, kubeletnode, nodeconfig, nodehost, ociimage, processes, projectimages
from ciliary.lab.nodebins import NodeBinaries
from realnode_lab import ROOT, lab_images, node_binaries

pytestmark = pytest.mark.integration


@dataclass
class Containerd:
    bins: NodeBinaries
    socket: Path

    run_dir: Path

    def run(self, image: str, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """``ctr run`` with every path it would share machine-wide (fifos, runc root, cgroup) made ours."""
        return self.ctr("run", "--rm", "--fifo-dir", str(self.run_dir / "fifo"), "--runc-root",
                        str(self.run_dir / "runc"), "--cgroup", f"/ciliary-ctrd-{os.getpid()}/{name}",
                        image, name, *argv)

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bins.ctr), "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    bins = node_binaries()
    root = Path(tempfile.mkdtemp(prefix="ciliary-ctrd-", dir="/var/tmp"))
    run = Path(f"/run/ciliary/ctrd-{os.getpid()}")
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 3, "root": str(root / "root"), "state": str(run / "state"),
        "grpc": {"address": str(run / "containerd.sock")},
        "disabled_plugins": ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",
                             "io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"],
        "plugins": {"io.containerd.internal.v1.opt": {"path": str(root / "opt")}},
    }
    (root / "config.toml").write_text(nodeconfig.render_toml(config))
    log = open(root / "containerd.log", "wb")
    env = {**os.environ, "PATH": f"{bins.containerd.parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(bins.containerd), "--config", str(root / "config.toml")], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = Containerd(bins, run / "containerd.sock", run)
    cgroup = f"/ciliary-ctrd-{os.getpid()}"
    try:
        deadline = time.monotonic() + 30
        while handle.ctr("version").returncode != 0:
            assert proc.poll() is None, (root / "containerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "containerd did not answer within 30 s"
            time.sleep(0.2)
        yield handle
    finally:
        processes.terminate(proc)
        log.close()
        layout = nodehost.cgroup_layout()
        nodehost.remove_cgroup_root(layout, cgroup)
        kubeletnode.unmount_all([root, run])
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)


def test_ctr_imports_the_lab_images_under_their_names_and_the_app_image_runs(containerd: Containerd) -> None:
    built = lab_images()
    for image in built:
        images.import_image(containerd.bins.ctr, containerd.socket, image)
    listed = containerd.ctr("images", "list", "-q").stdout.split()
    assert {i.reference for i in built} <= set(listed), listed
    # unpacked for the default snapshotter, so containers can start from it
    run = containerd.run(images.APP_IMAGE, f"app-{os.getpid()}", "python3", "-c",
                         "import sys; print('python', sys.version_info[:2])")
    assert run.returncode == 0, run.stderr
    assert "python (3, 11)" in run.stdout
    agnhost = containerd.run(images.AGNHOST_IMAGE, f"agnhost-{os.getpid()}", "sh", "-c",
                             "/agnhost --help >/dev/null && curl --version && ip -V && dig -v")
    assert agnhost.returncode == 0, agnhost.stderr
    assert "curl" in agnhost.stdout and "iproute2" in agnhost.stdout


def test_the_project_images_start_their_entrypoints(containerd: Containerd) -> None:
    node_binaries()
    built = projectimages.project_images(ROOT, images.debian_suite())
    for image in built:
        images.import_image(containerd.bins.ctr, containerd.socket, image)
    operator, agent = built
    # ctr's arguments replace ENTRYPOINT and CMD; the image's USER and ENV (PATH into the venv) stay
    out = containerd.run(operator.reference, f"operator-{os.getpid()}", operator_entry := "ciliary-operator", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    out = containerd.run(operator.reference, f"operator-id-{os.getpid()}", "id", "-u")
    assert out.stdout.strip() == "65532", out.stdout + out.stderr
    out = containerd.run(agent.reference, f"agent-{os.getpid()}", "ciliary-agent-entrypoint", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    out = containerd.run(agent.reference, f"agent-py-{os.getpid()}", "python", "-c",
                         "import bcc, ciliary.nodeagent.main, ciliary.cni.main; "
                         "from ciliary.nodeagent import rendering; assert rendering.DATAPATH_C_DIR.is_dir()")
    assert out.returncode == 0, out.stderr
    config = json.loads(images_config(operator))
    assert config["config"]["Entrypoint"] == [operator_entry] and config["config"]["User"] == "65532:65532"


def images_config(image: images.BuiltImage) -> bytes:
    index = ociimage.read_index(image.layout)
    manifest = json.loads(ociimage.read_blob(image.layout, index["manifests"][0]["digest"]))
    return ociimage.read_blob(image.layout, manifest["config"]["digest"])
