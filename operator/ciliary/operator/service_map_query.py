"""What the service map asks the Observer API for (pure: no gRPC, HTTP): the page's URL parameters as one
``GetFlows`` request, filtered as ``hubble observe`` with the same flags would filter.

Parameters (each may repeat; values are passed to the server, which validates them as it validates
the ``hubble`` CLI's, so a malformed one comes back as INVALID_ARGUMENT naming the field):

- either end, as ``hubble observe --namespace/--pod/--label/--ip/--port/--identity``: ``namespace``,
  ``pod`` (``ns/name`` prefix), ``label`` (selector), ``ip`` (address or CIDR), ``port``, ``identity``;
- one end: ``from-pod``, ``to-pod``, ``from-label``, ``to-label``, ``from-ip``, ``to-ip``,
  ``from-port``, ``to-port``, ``from-identity``, ``to-identity``;
- neither: ``verdict`` (FORWARDED, DROPPED), ``protocol``, ``node-name``;
- ``window`` (seconds back, ``--since``), ``limit`` (flows per Ciliary node, ``--last``).

As the CLI does, "either end" criteria make two filters (all of them on the source side, or all on
the destination side), and every other criterion is added to both. Values of one parameter are
alternatives (OR). With a pod criterion, ``namespace`` only qualifies bare pod names (``pod=xwing``
is ``default/xwing`` in namespace default), as ``hubble observe --namespace NS --pod NAME`` does;
without one it is the "either end in NS" criterion.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from ciliary.hubbleapi import flow_pb2, observer_pb2

DEFAULT_WINDOW_S, MAX_WINDOW_S = 300, 86400
DEFAULT_LIMIT, MAX_LIMIT = 2000, 20000
MAX_VALUES = 32
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
EITHER_END = {"pod": ("source_pod", "destination_pod"), "label": ("source_label", "destination_label"),
              "ip": ("source_ip", "destination_ip"), "port": ("source_port", "destination_port"),
              "identity": ("source_identity", "destination_identity")}
ONE_END = {f"{side}-{name}": fields[i] for name, fields in EITHER_END.items()
           for i, side in enumerate(("from", "to"))}
NEITHER = {"protocol": "protocol", "node-name": "node_name"}
VERDICTS = ("FORWARDED", "DROPPED")
PARAMETERS = frozenset({"namespace", "verdict", "window", "limit", *EITHER_END, *ONE_END, *NEITHER})


class QueryError(ValueError):
    """A service-map query parameter that cannot be honoured; names the parameter and the value."""

    def __init__(self, parameter: str, value: str, problem: str) -> None:
        super().__init__(f"{parameter}={value!r}: {problem}")
        self.parameter = parameter
        self.value = value


@dataclass(frozen=True)
class MapQuery:
    """What the map shows: flows of ``namespace`` (either end; all namespaces when empty) with one of
    ``verdicts`` (all when empty) and the other ``criteria`` (parameter -> values), of the last
    ``window_s`` seconds, at most ``limit`` per Ciliary node."""

    namespace: str = ""
    verdicts: tuple[str, ...] = ()
    window_s: int = DEFAULT_WINDOW_S
    limit: int = DEFAULT_LIMIT
    criteria: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def whitelist(self) -> list[flow_pb2.FlowFilter]:
        base: dict[str, Any] = {}
        if self.verdicts:
            base["verdict"] = [flow_pb2.Verdict.Value(v) for v in self.verdicts]
        source: dict[str, Any] = {}
        destination: dict[str, Any] = {}
        pods = any(name in ("pod", "from-pod", "to-pod") for name, _ in self.criteria)
        if self.namespace and not pods:
            source["source_pod"] = [f"{self.namespace}/"]
            destination["destination_pod"] = [f"{self.namespace}/"]
        for name, values in self.criteria:
            typed: list[Any] = [int(v) for v in values] if name.endswith("identity") else list(values)
            if name in ("pod", "from-pod", "to-pod") and self.namespace:
                typed = [v if "/" in v else f"{self.namespace}/{v}" for v in typed]
            if name in EITHER_END:
                src_field, dst_field = EITHER_END[name]
                source[src_field] = source.get(src_field, []) + typed
                destination[dst_field] = destination.get(dst_field, []) + typed
            else:
                target = ONE_END.get(name) or NEITHER[name]
                base[target] = base.get(target, []) + typed
        if source:
            return [flow_pb2.FlowFilter(**base, **source), flow_pb2.FlowFilter(**base, **destination)]
        return [flow_pb2.FlowFilter(**base)] if base else []

    def request(self, now: float) -> observer_pb2.GetFlowsRequest:
        """The GetFlows request (history only, no follow)."""
        since = now - self.window_s
        return observer_pb2.GetFlowsRequest(
            number=self.limit, whitelist=self.whitelist(),
            since=timestamp_pb2.Timestamp(seconds=int(since), nanos=int(since % 1 * 1e9)))


def _bounded(name: str, raw: str, default: int, top: int) -> int:
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise QueryError(name, raw, "not an integer") from None
    if not 1 <= value <= top:
        raise QueryError(name, raw, f"must be between 1 and {top}")
    return value


def parse_query(pairs: Iterable[tuple[str, str]]) -> MapQuery:
    """A :class:`MapQuery` from URL parameters (``request.query.items()``: a name may repeat; empty
    values are ignored); raises :class:`QueryError` for a parameter it does not know or cannot use."""
    values: dict[str, list[str]] = {}
    for name, raw in pairs:
        if name not in PARAMETERS:
            raise QueryError(name, raw, "unknown parameter")
        for value in (raw.split(",") if name == "verdict" else [raw]):
            if value.strip():
                values.setdefault(name, []).append(value.strip())
    for name, given in values.items():
        if len(given) > MAX_VALUES:
            raise QueryError(name, given[0], f"more than {MAX_VALUES} values")
        if name != "verdict" and name not in (*EITHER_END, *ONE_END, *NEITHER) and len(given) > 1:
            raise QueryError(name, given[1], "given more than once")
        for value in given:
            if name.endswith("identity") and not value.isdigit():
                raise QueryError(name, value, "not an identity number")
    namespace = values.get("namespace", [""])[0]
    if namespace and not NAMESPACE_RE.match(namespace):
        raise QueryError("namespace", namespace, "not a Kubernetes namespace name")
    verdicts = tuple(sorted({v.upper() for v in values.get("verdict", [])}))
    for verdict in verdicts:
        if verdict not in VERDICTS:
            raise QueryError("verdict", verdict, "one of " + ", ".join(VERDICTS))
    criteria = tuple(sorted((name, tuple(given)) for name, given in values.items()
                            if name in EITHER_END or name in ONE_END or name in NEITHER))
    return MapQuery(namespace, verdicts, _bounded("window", values.get("window", [""])[0], DEFAULT_WINDOW_S,
                                                  MAX_WINDOW_S),
                    _bounded("limit", values.get("limit", [""])[0], DEFAULT_LIMIT, MAX_LIMIT), criteria)
