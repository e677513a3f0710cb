"""The CRDs in crds/ against a real kube-apiserver: examples apply, schema-invalid objects are refused.

Needs the ``kube`` fixture (tests/integration/conftest.py), which provides
``kube.kubectl(*args, input=None) -> subprocess.CompletedProcess`` against a
running API server (namespace handling is the fixture's business).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
CRDS = sorted((ROOT / "crds").glob("*.cilium.io.yaml"))
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "crds" / "invalid").glob("*.yaml"))


def _headers(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep:
            found[key] = value.strip()
    return found


def _run(kube: Any, *args: str) -> Any:
    return kube.kubectl(*args)


@pytest.fixture
def crds(kube: Any) -> Any:
    kube.lab.install_crds()  # server-side apply, then wait until both CRDs are Established
    return kube


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_applies(crds: Any, path: Path) -> None:
    done = _run(crds, "apply", "-f", str(path))
    assert done.returncode == 0, done.stderr
    _run(crds, "delete", "--wait=false", "-f", str(path))


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_object(crds: Any, path: Path) -> None:
    headers = _headers(path)
    done = _run(crds, "apply", "-f", str(path))
    if headers["expect"] == "schema":
        assert done.returncode != 0, f"{path.name} was accepted by the API server"
        assert headers["message"] in (done.stderr + done.stdout)
    else:
        # Operator-layer objects fit the schema; the operator marks them Valid=False later.
        assert done.returncode == 0, done.stderr
        _run(crds, "delete", "--wait=false", "-f", str(path))
