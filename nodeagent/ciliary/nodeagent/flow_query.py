"""The flow API's query parameters (``GET /v1/flows?verdict=&direction=&protocol=&ip=&port=&identity=&namespace=
&pod=``, see ``flowapi``) as one predicate over enriched flows (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class BadQuery(ValueError):
    """A query parameter the flow API cannot take (the answer is 400 with this message)."""


def query_int(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadQuery(f"{name} must be an integer, not {raw!r}") from exc
    if value < 0:
        raise BadQuery(f"{name} must not be negative")
    return value


def make_filter(query: Mapping[str, str]) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over enriched flows from the query parameters."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    verdict = query.get("verdict", "").upper()
    if verdict:
        if verdict not in ("FORWARDED", "DROPPED"):
            raise BadQuery("verdict must be FORWARDED or DROPPED")
        checks.append(lambda f: f["verdict"] == verdict)
    direction = query.get("direction", "").lower()
    if direction:
        if direction not in ("ingress", "egress"):
            raise BadQuery("direction must be ingress or egress")
        checks.append(lambda f: f["direction"] == direction)
    protocol = query.get("protocol", "").upper()
    if protocol:
        checks.append(lambda f: str(f["protocol"]).upper() == protocol)
    ip = query.get("ip", "")
    if ip:
        checks.append(lambda f: ip in (f["src"]["ip"], f["dst"]["ip"]))
    port = query_int(query, "port")
    if port is not None:
        checks.append(lambda f: port in (f["src"]["port"], f["dst"]["port"]))
    identity = query_int(query, "identity")
    if identity is not None:
        checks.append(lambda f: identity in (f["src"]["identity"], f["dst"]["identity"]))
    namespace = query.get("namespace", "")
    if namespace:
        checks.append(lambda f: namespace in (f["src"]["namespace"], f["dst"]["namespace"]))
    pod = query.get("pod", "")
    if pod:
        ns, _, name = pod.rpartition("/")

        def pod_matches(f: Mapping[str, Any]) -> bool:
            return any(side["pod"] == name and (not ns or side["namespace"] == ns) for side in (f["src"], f["dst"]))

        checks.append(pod_matches)
    return lambda f: all(check(f) for check in checks)
