"""Fixtures for the bcc datapath tests: a private topology, one Datapath per module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dp_topology import Topology


@pytest.fixture(scope="module")
def topology(tool) -> Iterator[Topology]:
    tool("ip")  # the topology is built and entered with iproute2
    topo = Topology(pods=3)
    try:
        topo.up()
        yield topo
    finally:
        topo.down()
