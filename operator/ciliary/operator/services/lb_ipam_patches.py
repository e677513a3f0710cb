"""LB IPAM's writes, planned (pure): Service bodies in, claims out; outcomes in, status patches out.

:func:`claim_from_body` reads what :mod:`ciliary.operator.services.lb_ipam` needs from a Service body.
:func:`service_patch` and :func:`pool_patch` return the JSON merge patch of the status subresource
that makes an object show its outcome, or None when it already does, so the reconciler writes only
what changed (its own write comes back as a watch event and plans nothing); :func:`release_patch`
undoes LB IPAM's part of a Service that is no longer a LoadBalancer without a class. A Service's other
conditions are kept; a pool shows Cilium's conditions ``cilium.io/IPsTotal``, ``IPsAvailable``,
``IPsUsed`` (counts as messages) and ``cilium.io/PoolConflict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ciliary.operator.services.lb_ipam import CONDITION, Outcome, PoolReport, ServiceClaim

POOL_CONDITIONS = ("cilium.io/IPsTotal", "cilium.io/IPsAvailable", "cilium.io/IPsUsed", "cilium.io/PoolConflict")


def claim_from_body(body: Mapping[str, Any]) -> ServiceClaim:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    ingress = ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return ServiceClaim(
        namespace=str(meta.get("namespace") or "default"), name=str(meta.get("name", "")),
        created=str(meta.get("creationTimestamp", "")), type=str(spec.get("type") or "ClusterIP"),
        load_balancer_class=spec.get("loadBalancerClass") or None, labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        ip_families=tuple(spec.get("ipFamilies") or ("IPv4",)),
        ip_family_policy=str(spec.get("ipFamilyPolicy") or "SingleStack"),
        load_balancer_ip=str(spec.get("loadBalancerIP") or ""),
        holds=tuple(str(i["ip"]) for i in ingress if isinstance(i, Mapping) and i.get("ip")))


def managed(body: Mapping[str, Any]) -> bool:
    """Whether LB IPAM has written this Service's condition (it then owns its ingress IPs)."""
    return any(c.get("type") == CONDITION for c in (body.get("status") or {}).get("conditions") or [])


def _condition(kind: str, status: str, reason: str, message: str, generation: Any, now: str,
               old: Mapping[str, Any] | None) -> dict[str, Any]:
    same = old is not None and old.get("status") == status
    out = {"type": kind, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": str(old.get("lastTransitionTime")) if same and old else now}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _merged(conditions: list[Mapping[str, Any]], fresh: list[dict[str, Any]]) -> list[Mapping[str, Any]] | None:
    """The conditions with ``fresh`` in place of those of the same types; None when nothing changes."""
    by_type = {c.get("type"): c for c in conditions}
    if all(_same(by_type.get(f["type"]), f) for f in fresh):
        return None
    kinds = {f["type"] for f in fresh}
    return [c for c in conditions if c.get("type") not in kinds] + fresh


def _same(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    return old is not None and all(old.get(k) == v for k, v in new.items() if k != "lastTransitionTime")


def service_patch(body: Mapping[str, Any], outcome: Outcome, now: str) -> dict[str, Any] | None:
    status = body.get("status") or {}
    conditions = list(status.get("conditions") or [])
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    fresh = _condition(CONDITION, "True" if outcome.satisfied else "False", outcome.reason, outcome.message,
                       (body.get("metadata") or {}).get("generation"), now, old)
    merged = _merged(conditions, [fresh])
    ingress = [{"ip": ip, "ipMode": "VIP"} for ip in outcome.ips]
    held = [{"ip": i.get("ip"), "ipMode": i.get("ipMode", "VIP")}
            for i in (status.get("loadBalancer") or {}).get("ingress") or []]
    if merged is None and held == ingress:
        return None
    patch: dict[str, Any] = {"loadBalancer": {"ingress": ingress}}
    if merged is not None:
        patch["conditions"] = merged
    return {"status": patch}


def pool_patch(body: Mapping[str, Any], report: PoolReport | None, invalid: str, now: str) -> dict[str, Any] | None:
    """``report`` None with ``invalid`` set: the pool's spec was refused (shown as a conflict, nothing allocated)."""
    conditions = list((body.get("status") or {}).get("conditions") or [])
    by_type = {c.get("type"): c for c in conditions}
    generation = (body.get("metadata") or {}).get("generation")
    total, used = (report.total, report.used) if report else (0, 0)
    conflict = invalid or (report.conflict if report else "")
    fresh = [_condition(kind, "Unknown", "noreason", str(value), generation, now, by_type.get(kind))
             for kind, value in zip(POOL_CONDITIONS[:3], (total, total - used, used), strict=True)]
    fresh.append(_condition(POOL_CONDITIONS[3], "True" if conflict else "False",
                            ("invalid_spec" if invalid else "cidr_overlap") if conflict else "resolved",
                            conflict, generation, now, by_type.get(POOL_CONDITIONS[3])))
    merged = _merged(conditions, fresh)
    return None if merged is None else {"status": {"conditions": merged}}


def release_patch(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """For a Service LB IPAM gave IPs to that is no longer eligible: no ingress IPs, no LB IPAM condition."""
    if not managed(body):
        return None
    status = body.get("status") or {}
    return {"status": {"loadBalancer": {"ingress": []},
                       "conditions": [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]}}
