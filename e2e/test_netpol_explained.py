"""A NetworkPolicy's verdict explained by ``ciliary policy trace``, on the pods of test_netpol_enforcement
under its ``from-pod-b`` policy: the trace names the NetworkPolicy's rule.

Runs on the real-node lab (``REAL_NODES`` below): the trace reads each node's datapath from that node's
agent (through its agent pod where the registered address is another node's loopback), and the test
checks which agent answered, as test_policy_explained.py does.
"""

from __future__ import annotations

import re

import pytest

from test_netpol_enforcement import (  # noqa: F401  (pods, policies: the module's fixtures, reused here)
    XA,
    XB,
    enforce_from_pod_b,
    pods,
    policies,
)
from test_policy_enforcement import trace

pytestmark = pytest.mark.e2e
#: on the session's real-node lab: the CLI reaches each node's agent through that node's agent pod, and the
#: test checks which agent answered (docstring)
REAL_NODES = True


def test_a_networkpolicy_verdict_is_traced_to_its_rule(lab, pods, policies):  # noqa: F811
    enforce_from_pod_b(pods, policies)
    traced = trace(lab, XB, XA, "80/tcp")
    assert "NetworkPolicy np-x/from-pod-b rule 0 ingress[0]; matched l3-only" in traced.stdout, \
        traced.stdout + traced.stderr
    read = dict(re.findall(r"^  (node-\d)'s datapath read by its agent (.+)$", traced.stdout, re.M))
    assert sorted(read) == ["node-1", "node-2"], traced.stdout
    for node, via in read.items():
        lab.assert_own_agent(node, via)
