"""``ciliary lab up``: real kubelets, the only lab; a lab the removed process lab left is refused, and taken down."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ciliary.cli.main import build_parser
from ciliary.lab import processes, reallab
from ciliary.lab.lab import PROCESS_LAB_GONE, Lab, LabError, is_process_lab
from ciliary.lab.layout import Binaries, LabLayout

NO_BINARIES = Binaries(*[Path("/nonexistent")] * 5)


def old_process_lab(tmp_path: Path) -> Lab:
    """A state directory as ``ciliary lab up --process`` left it: ``lab.json`` with nodes but no ``real_nodes``."""
    layout = LabLayout(state_dir=tmp_path / "lab", prefix=f"t{os.getpid() % 100000}")
    layout.state_dir.mkdir()
    layout.config_file.write_text(json.dumps({"nodes": 2, "etcd": 1, "apiserver": 2}))
    return Lab(layout, NO_BINARIES)


def test_real_nodes_are_the_only_lab_and_the_old_flag_changes_nothing() -> None:
    parser = build_parser()
    assert parser.parse_args(["lab", "up"]).real_nodes is False
    assert parser.parse_args(["lab", "up", "--real-nodes"]).real_nodes is True
    assert not hasattr(parser.parse_args(["lab", "up"]), "process")


def test_the_process_flag_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab", "up", "--process"])
    assert "unrecognized arguments: --process" in capsys.readouterr().err


def test_a_process_lab_is_a_lab_json_with_nodes_but_not_real_ones() -> None:
    assert is_process_lab({"nodes": 2}) is True
    assert is_process_lab({"nodes": 2, "kube_proxy": "iptables"}) is True
    assert is_process_lab({"nodes": 2, "real_nodes": True}) is False
    assert is_process_lab({"nodes": 0}) is False  # the integration tests' control plane alone
    assert is_process_lab({}) is False


def test_lab_up_refuses_an_old_process_lab_naming_lab_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = old_process_lab(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(LabError) as refused:
        reallab.up_command(lab, 2, say=lambda _: None)
    assert str(refused.value) == PROCESS_LAB_GONE and "`ciliary lab down`" in PROCESS_LAB_GONE
    with pytest.raises(LabError, match="ciliary lab down"):
        reallab.up(lab, ["node-1", "node-2"], chart=True)
    assert json.loads(lab.layout.config_file.read_text()) == {"nodes": 2, "etcd": 1, "apiserver": 2}  # untouched


def test_lab_down_stops_an_old_process_labs_processes_and_removes_its_state(tmp_path: Path) -> None:
    lab = old_process_lab(tmp_path)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    names = ("scheduler", "runtime-node-1", "agent-node-1", "operator")
    pids = [processes.spawn(lab.layout, name, sleeper) for name in names]
    assert all(processes.running_pid(lab.layout, n) for n in names)
    try:
        lab.down(log=False)
        assert [pid for pid in pids if alive(pid)] == []
        assert not lab.layout.state_dir.exists()
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def alive(pid: int) -> bool:
    """``pid`` runs (neither gone nor a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
