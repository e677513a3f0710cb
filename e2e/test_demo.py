"""`make demo` works as shown: the Star Wars scene from a fresh lab, checked line by line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ciliary.lab import sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_demo_shows_the_scene(tmp_path):
    sessions.reap_stale(ROOT, "demo", "d")
    layout = sessions.session_layout(ROOT, "demo", "d")
    env = {**os.environ, "CILIARY_LAB_DIR": str(layout.state_dir), "CILIARY_LAB_PREFIX": layout.prefix}
    try:
        out = subprocess.run([sys.executable, "-m", "ciliary.lab.demo"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
        assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
        after_policy, l7 = text.split("The tiefighter (org=empire) lands")[1].split("Apply an L7 policy")
        assert after_policy.count("Ship landed") == 1 and "timed out" in after_policy
        assert "Ship landed" in l7 and "HTTP/1.1 403 Forbidden Access denied" in l7
        assert re.search(r"default/tiefighter:\d+ \(ID:\d+\) -> default/deathstar:80 .*PUT /v1/exhaust-port => 403 "
                         r"ingress DROPPED \(L7_DENIED\)", l7), l7
        assert re.search(r"POST /v1/request-landing => 200 ingress FORWARDED +by CiliumNetworkPolicy default/rule1", l7)
        assert re.search(r"default/xwing:\d+ \(ID:\d+\) -> default/deathstar:80 .* DROPPED \(POLICY_DENIED\)", text)
        assert "CiliumNetworkPolicy default/rule1 rule 0 ingress[0]" in text
        assert '"enforcing": true' in text
    finally:
        Lab(layout, Binaries.discover()).down(log=False)
