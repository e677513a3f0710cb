"""Pydantic models of the ``cilium.io/v2`` policy API (CNP and CCNP) and the parser for it.

The package mirrors the CRDs in ``crds/`` field for field (a unit test keeps
them in step). Handlers call :func:`parse_policy` once at the edge and pass the
resulting models inward; semantic checks are in ``ciliary.operator.api.validation``.
Modules: ``base`` (wire base), ``selectors``, ``ports`` (L4/L7/TLS/ICMP),
``rules`` (rule and directions), ``policies`` (the kinds, status, parsing),
``errors`` (typed errors).
"""

from ciliary.operator.api.errors import PolicyError, PolicyInvalidError, PolicyParseError, PolicyProblem
from ciliary.operator.api.policies import (
    AnyPolicy,
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    NodePolicyStatus,
    PolicyCondition,
    PolicyStatus,
    parse_policy,
)
from ciliary.operator.api.rules import EgressDenyRule, EgressRule, IngressDenyRule, IngressRule, Rule

__all__ = [
    "AnyPolicy",
    "CiliumClusterwideNetworkPolicy",
    "CiliumNetworkPolicy",
    "EgressDenyRule",
    "EgressRule",
    "IngressDenyRule",
    "IngressRule",
    "NodePolicyStatus",
    "PolicyCondition",
    "PolicyError",
    "PolicyInvalidError",
    "PolicyParseError",
    "PolicyProblem",
    "PolicyStatus",
    "Rule",
    "parse_policy",
]
