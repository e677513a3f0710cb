"""Fixtures of the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import pytest
from deploy_helpers import Helm


@pytest.fixture(scope="session")
def helm(tool) -> Helm:
    return Helm(tool("helm"))
