"""Fixtures for running the real operator process against the integration control plane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from op_harness import OperatorProcess


@pytest.fixture(scope="module")
def crds(kube) -> None:
    kube.lab.install_crds()


@pytest.fixture
def operator(kube, crds, tmp_path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(kube, tmp_path / "operator.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
