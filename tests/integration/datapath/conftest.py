"""Fixtures for the bcc datapath tests: a private topology, one Datapath per module.

Also the hypothesis profiles (``ci`` by default: derandomized, so a CI run
is reproducible) and the terminal-summary line with the differential test's case count.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from dp_packets import DIFFERENTIAL
from dp_topology import Topology

# The differential test runs many packets per example: no per-example deadline. Derandomized by
# default like the root conftest's "ci" profile; HYPOTHESIS_PROFILE=explore explores at random.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def topology(tool) -> Iterator[Topology]:
    tool("ip")  # the topology is built and entered with iproute2
    topo = Topology(pods=3)
    try:
        topo.up()
        yield topo
    finally:
        topo.down()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if DIFFERENTIAL["policies"]:
        d = DIFFERENTIAL
        terminalreporter.write_line(
            f"differential test: {int(d['verdicts'])} tc verdicts ({int(d['enforced'])} on enforced directions, "
            f"{int(d['dropped'])} drops, {int(d['spoofed'])} of them spoofed sources, "
            f"{int(d['own_veth'])} from_pod runs on the sender's own veth) compared with "
            f"evaluate_entries: {int(d['packets'])} packets x 2 hooks over {int(d['policies'])} random policies "
            f"in {d['seconds']:.1f} s")
