"""A NetworkPolicy's verdict explained by ``ciliary policy trace``, on the pods of test_netpol_enforcement
under its ``from-pod-b`` policy: the trace names the NetworkPolicy's rule.

Runs on the process lab (``REAL_NODES`` below is False) for the reason test_policy_explained.py gives: the
trace reads each node's datapath from the agent at the address it registered in etcd, and the chart's
agents register their node-local loopback listener, so on real nodes a trace run on one node reads that
node's agent for every node.
"""

from __future__ import annotations

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
#: the CLI reaches agents at their registered loopback address: not on real nodes yet (docstring); it passed
#: there on 2026-12-06, its trace reading the etcd node's agent for every node, which is no evidence
REAL_NODES = False


def test_a_networkpolicy_verdict_is_traced_to_its_rule(lab, pods, policies):  # noqa: F811
    enforce_from_pod_b(pods, policies)
    traced = trace(lab, XB, XA, "80/tcp")
    assert "NetworkPolicy np-x/from-pod-b rule 0 ingress[0]" in traced.stdout, traced.stdout + traced.stderr
