"""Root pytest configuration: privileged suites are skipped, loudly, when not root.

CI runs as root, so every suite runs there; an unprivileged developer still gets
the unit tests.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, eBPF, control plane)")
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("e2e"):
            item.add_marker(skip)
