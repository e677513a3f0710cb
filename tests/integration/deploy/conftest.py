"""Fixtures of the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import pytest
from deploy_helpers import Helm, find_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    return find_helm()
