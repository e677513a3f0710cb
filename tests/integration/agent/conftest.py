"""Fixtures shared by the agent integration tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[str]:
    """A network namespace of the test's own with loopback up, removed afterwards (also on failure)."""
    tag = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "")[:6]
    name = f"cy-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
