"""Flows over HTTP: the datapath's flow events, enriched, in a bounded ring, served as JSON lines.

Routes (added to the health server, ``health.start(..., routes=...)``):

``GET /v1/flows``  one JSON object per line (``application/x-ndjson``), oldest first.
  Parameters (all optional, combined with AND):
  - ``last=N``       the last N matching flows of the ring (default 20, at most the ring size);
  - ``follow=1``     then stream new matching flows until the client closes
                     (or ``seconds=S`` elapsed, if given);
  - ``verdict=FORWARDED|DROPPED``, ``direction=ingress|egress``, ``protocol=TCP|UDP|ICMP|<n>``;
  - ``ip=A``, ``port=P``, ``identity=I``, ``namespace=NS``, ``pod=NAME`` or ``pod=NS/NAME``:
    match either side (src or dst).
``GET /metrics``  Prometheus text exposition of the flow metrics (``flow_metrics``: Hubble's and
  Cilium's names, bounded labels).
``GET /v1/flows/stats``  ``{node, seen, lost, lost_kernel, lost_reader, lost_followers,
  ring_size, ring_capacity, followers}``; ``lost`` is the sum of the three losses.

A flow (:func:`enrich`)::

  {"time": "2025-01-02T03:04:05.123456789Z", "node": "node-1",
   "verdict": "FORWARDED"|"DROPPED", "drop_reason": ""|"POLICY_DENIED"|"POLICY_DENY_RULE"|"INVALID"
                 |"FRAGMENT_NO_L4"|"INVALID_L3"|"UNSUPPORTED_L3"
                 |"SPOOFED_SOURCE",
   "reason": "OK_POLICY"|"OK_REPLY"|"OK_UNENFORCED"|"DROP_POLICY"|...,
   "direction": "ingress"|"egress", "is_reply": false, "protocol": "TCP", "length": 60,
   "src": {"ip", "port", "identity", "labels": [...], "namespace", "pod"},
   "dst": {...same...}, "tcp_flags": ["SYN"], "policy": [RuleRef as JSON, ...], "ifindex": 7}

A connection a pod opened through a Service frontend (the socket load balancer translated it to the
backend in ``dst``, or ``src`` on a reply) adds ``"service": "namespace/name"`` (empty when no Service
has that frontend any more) and ``"frontend": "10.96.0.10:80"``.

An L7 flow (an HTTP request judged by the node's Envoy, ``l7_flows``) adds ``"type": "L7"`` and
``"l7": {"http": {"method", "url", "host", "code", "protocol", "latency_ms"}}``; its verdict is
DROPPED (``drop_reason`` ``L7_DENIED``: answered 403) or FORWARDED, ``policy`` the allowing rule.

``direction`` is from the local pod's point of view (ingress: to the pod). ICMP
flows carry the ICMP type in ``dst.port`` and 0 in ``src.port``. ``policy`` lists
the rules of the deciding entry (``Datapath.rules_for(cookie)``), empty when no
rule decided (unenforced, reply, default deny). ``namespace``/``pod`` are filled
for local pods from the intent's endpoints; for remote peers the namespace comes
from the identity's ``io.kubernetes.pod.namespace`` label and ``pod`` is empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from aiohttp import web

from ciliary.nodeagent import flow_metrics
from ciliary.nodeagent.flow_query import BadQuery, make_filter, query_int
from ciliary.operator import intents

log = logging.getLogger(__name__)

RING_CAPACITY = 4096
FOLLOWER_QUEUE = 1024
DRAIN_INTERVAL_S = 0.05
DEFAULT_LAST = 20
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP", 58: "ICMPv6"}
DROP_REASONS = {"DROP_POLICY": "POLICY_DENIED", "DROP_POLICY_DENY": "POLICY_DENY_RULE", "DROP_INVALID": "INVALID",
                "DROP_FRAGMENT": "FRAGMENT_NO_L4", "DROP_INVALID_L3": "INVALID_L3",
                "DROP_UNSUPPORTED_L3": "UNSUPPORTED_L3", "DROP_SPOOFED_SOURCE": "SPOOFED_SOURCE",
                "DROP_PROXY_UNAVAILABLE": "PROXY_UNAVAILABLE"}
TCP_FLAGS = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
             (0x40, "ECE"), (0x80, "CWR"))
NAMESPACE_LABEL = "io.kubernetes.pod.namespace="


def rfc3339_ns(seconds: float) -> str:
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    stamp = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


def tcp_flag_names(flags: int) -> list[str]:
    return [name for bit, name in TCP_FLAGS if flags & bit]


def no_service(_address: str, _port: int, _protocol: int) -> str:
    """No load-balancing intent: no frontend names a Service."""
    return ""


@dataclass(frozen=True)
class IntentIndex:
    """What enrichment needs from an intent, indexed once per intent."""

    node: str
    pods: Mapping[str, tuple[str, str]]
    """Local pod IP -> (namespace, name)."""
    labels: Mapping[int, tuple[str, ...]]
    revision: int = 0
    """The policy revision of the intent (Hubble's Policy.revision)."""
    service_of: Callable[[str, int, int], str] = field(default=no_service, compare=False, repr=False)
    """(frontend address, port, L4 protocol number) -> the Service ``namespace/name`` whose frontend it is in the
    load-balancing intent in force, "" when none (``load_balancing.LoadBalancing.service_of``)."""
    hubble_endpoints: dict[tuple[str, int], Any] = field(default_factory=dict, compare=False, repr=False)
    """(ip, identity) -> flow.Endpoint, filled by ``hubble_convert`` (lives and dies with this index)."""

    @classmethod
    def of(cls, node: str, intent: intents.NodeIntent | None,
           service_of: Callable[[str, int, int], str] = no_service) -> IntentIndex:
        if intent is None:
            return cls(node, {}, {}, service_of=service_of)
        return cls(node, {e.ipv4: (e.namespace, e.pod) for e in intent.endpoints},
                   {int(k): tuple(v) for k, v in intent.identity_labels.items()}, intent.revision,
                   service_of=service_of)

    def peer(self, ip: str, port: int, identity: int) -> dict[str, Any]:
        labels = list(self.labels.get(identity, ()))
        namespace, pod = self.pods.get(ip, ("", ""))
        if not namespace:
            namespace = next((label.split(NAMESPACE_LABEL, 1)[1] for label in labels if NAMESPACE_LABEL in label), "")
        return {"ip": ip, "port": port, "identity": identity, "labels": labels, "namespace": namespace,
                "pod": pod}


class EntryQueue(asyncio.Queue["RingEntry"]):
    """A Hubble follower's queue; ``lost`` counts the entries it had no room for."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.lost = 0


class RingEntry:
    """One kept event with the intent index and rule lookup in force when it arrived; ``flow`` caches
    its Hubble form (``hubble_convert.to_flow``), built the first time a Hubble client reads it, and
    ``wire`` the serialized GetFlowsResponse carrying it, built the first time it is sent."""

    __slots__ = ("event", "flow", "index", "rules_for", "wire")

    def __init__(self, event: Any, index: IntentIndex, rules_for: Callable[[int], Iterable[intents.RuleRef]]) -> None:
        self.event = event
        self.index = index
        self.rules_for = rules_for
        self.flow: Any = None
        self.wire: bytes | None = None


def enrich(event: Any, index: IntentIndex, rules_for: Callable[[int], Iterable[intents.RuleRef]]) -> dict[str, Any]:
    """A ``flows.FlowEvent`` as the flow API's JSON object."""
    reason = getattr(event.reason, "name", str(event.reason))
    verdict = str(event.verdict).upper()
    icmp = event.protocol in (1, 58)
    return {
        "time": rfc3339_ns(event.time),
        "node": index.node,
        "verdict": verdict,
        "drop_reason": DROP_REASONS.get(reason, reason) if verdict == "DROPPED" else "",
        "reason": reason,
        "direction": event.direction,
        "is_reply": bool(event.is_reply),
        "protocol": PROTOCOLS.get(event.protocol, str(event.protocol)),
        "length": event.length,
        "src": index.peer(str(event.src), 0 if icmp else event.sport, event.src_identity),
        "dst": index.peer(str(event.dst), event.sport if icmp else event.dport, event.dst_identity),
        "tcp_flags": tcp_flag_names(event.tcp_flags) if event.protocol == 6 else [],
        "policy": [r.model_dump(mode="json") for r in rules_for(event.cookie)] if event.cookie else [],
        "ifindex": event.ifindex,
        **_service_fields(event, index),
        **_l7_fields(event),
    }


def _service_fields(event: Any, index: IntentIndex) -> dict[str, Any]:
    """A connection a pod opened through a Service frontend: ``service`` (``namespace/name``, empty when no
    Service has that frontend now) and ``frontend`` (``address:port``)."""
    frontend = getattr(event, "frontend", None)
    if frontend is None:
        return {}
    return {"service": index.service_of(frontend[0], frontend[1], event.protocol),
            "frontend": f"{frontend[0]}:{frontend[1]}"}


def _l7_fields(event: Any) -> dict[str, Any]:
    """An L7 flow: an HTTP request (``l7_flows.L7Event``) and the rule that allowed it, or a DNS
    exchange (the DNS proxy's event, whose ``l7`` is already a dict)."""
    http = getattr(event, "http", None)
    if http is None:
        l7 = getattr(event, "l7", None)
        return {"l7": l7} if l7 else {}
    rule = getattr(event, "rule", None)
    return {"type": "L7", "l7": {"http": http.as_json()},
            "policy": [rule.model_dump(mode="json")] if rule is not None else []}


# ---------------------------------------------------------------- the hub


class FlowHub:
    """The ring of enriched flows and the followers streaming them."""

    def __init__(self, node: str, *, capacity: int = RING_CAPACITY) -> None:
        self.node = node
        # raw events with the intent index in force when they arrived: enriched only when read,
        # so the hot path (thousands of events per second) is an append
        self.ring: collections.deque[RingEntry] = collections.deque(maxlen=capacity)
        self.index = IntentIndex.of(node, None)
        self._intent: intents.NodeIntent | None = None
        self._service_of: Callable[[str, int, int], str] = no_service
        self.rules_for: Callable[[int], Iterable[intents.RuleRef]] = lambda _c: ()
        self.lost_kernel: Callable[[], int] = lambda: 0
        self.lost_reader: Callable[[], int] = lambda: 0
        self.seen = 0
        self.lost_followers = 0
        self.counts = flow_metrics.FlowCounts()
        """Every published event by ``flow_metrics.count_key``, folded into per-series totals at each scrape."""
        self.details = flow_metrics.DetailCounter()
        """The per-kind counts (policy verdicts, ports, HTTP, DNS) of the same events."""
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._entry_followers: set[EntryQueue] = set()
        """Hubble followers (observer_server): handed ring entries, converted by the reader."""
        self.started = time.time()

    def set_intent(self, intent: intents.NodeIntent | None) -> None:
        self._intent = intent
        self.index = IntentIndex.of(self.node, intent, self._service_of)

    def set_service_lookup(self, service_of: Callable[[str, int, int], str]) -> None:
        """Name Services by frontend from now on (``IntentIndex.service_of``; the agent's load balancing)."""
        self._service_of = service_of
        self.index = IntentIndex.of(self.node, self._intent, service_of)

    def publish(self, events: Iterable[Any]) -> int:
        """Enrich and keep ``events``; hand them to every follower (dropping for full ones)."""
        count = 0
        index, rules_for = self.index, self.rules_for
        counts, key, detail = self.counts.pending, flow_metrics.count_key, self.details.add
        for event in events:
            counts[key(event)] += 1
            detail(event)
            entry = RingEntry(event, index, rules_for)
            self.ring.append(entry)
            count += 1
            for entry_queue in self._entry_followers:
                try:
                    entry_queue.put_nowait(entry)
                except asyncio.QueueFull:
                    entry_queue.lost += 1
                    self.lost_followers += 1
            if not self._followers:
                continue
            flow = enrich(event, index, rules_for)
            for queue in self._followers:
                try:
                    queue.put_nowait(flow)
                except asyncio.QueueFull:
                    self.lost_followers += 1
        self.seen += count
        return count

    def stats(self) -> dict[str, Any]:
        lost_kernel, lost_reader = self.lost_kernel(), self.lost_reader()
        return {"node": self.node, "seen": self.seen,
                "lost": lost_kernel + lost_reader + self.lost_followers,
                "lost_kernel": lost_kernel, "lost_reader": lost_reader, "lost_followers": self.lost_followers,
                "ring_size": len(self.ring), "ring_capacity": self.ring.maxlen,
                "followers": len(self._followers) + len(self._entry_followers)}

    def history(self) -> list[dict[str, Any]]:
        """The kept flows, oldest first, enriched."""
        return [enrich(e.event, e.index, e.rules_for) for e in list(self.ring)]

    @contextlib.contextmanager
    def follow_entries(self, maxsize: int = FOLLOWER_QUEUE) -> Any:
        """A queue of the ring entries published from now on (full: the entry is lost and counted)."""
        queue = EntryQueue(maxsize)
        self._entry_followers.add(queue)
        try:
            yield queue
        finally:
            self._entry_followers.discard(queue)

    @contextlib.contextmanager
    def follow(self) -> Any:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=FOLLOWER_QUEUE)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)

    async def pump(self, reader: Any, stop: asyncio.Event, *, interval: float = DRAIN_INTERVAL_S) -> None:
        """Move what ``reader`` (a ``flows.FlowReader`` attached to the loop) decoded into the ring."""
        self.lost_kernel = reader.lost
        self.lost_reader = lambda: int(reader.dropped_by_reader)
        while not stop.is_set():
            self.publish(reader.drain())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        self.publish(reader.drain())


# ---------------------------------------------------------------- HTTP

HUB_KEY = web.AppKey("flow_hub", FlowHub)
METRICS_KEY = web.AppKey("flow_metrics", prometheus_client.CollectorRegistry)


def _line(flow: Mapping[str, Any]) -> bytes:
    return json.dumps(flow, separators=(",", ":")).encode() + b"\n"


async def get_flows(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    query = request.rel_url.query
    try:
        matches = make_filter(query)
        last = query_int(query, "last")
        seconds = float(query["seconds"]) if query.get("seconds") else None
    except (BadQuery, ValueError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    last = DEFAULT_LAST if last is None else min(last, hub.ring.maxlen or RING_CAPACITY)
    follow = query.get("follow", "") in ("1", "true", "yes")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    with hub.follow() if follow else contextlib.nullcontext() as queue:
        history = [f for f in hub.history() if matches(f)][-last:] if last else []
        if history:
            await response.write(b"".join(_line(f) for f in history))
        if queue is not None:
            deadline = time.monotonic() + seconds if seconds is not None else None
            while deadline is None or time.monotonic() < deadline:
                timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                try:
                    flow = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                batch = [flow]
                while not queue.empty() and len(batch) < 256:
                    batch.append(queue.get_nowait())
                data = b"".join(_line(f) for f in batch if matches(f))
                if data:
                    try:
                        await response.write(data)
                    except (ConnectionResetError, ConnectionError):
                        break
    with contextlib.suppress(ConnectionResetError, ConnectionError):
        await response.write_eof()
    return response


async def get_metrics(request: web.Request) -> web.Response:
    body = flow_metrics.text_exposition(request.app[METRICS_KEY].collect())
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def metrics_registry(hub: FlowHub) -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)

    def lost() -> dict[str, int]:
        return {"perf_event_ring_buffer": hub.lost_kernel(),
                "observer_events_queue": hub.lost_reader() + hub.lost_followers}

    registry.register(flow_metrics.FlowMetrics(hub.counts, lost,
                                               lambda: (len(hub.ring), hub.ring.maxlen or 0),
                                               lambda: hub.details.counts))
    return registry


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[HUB_KEY].stats())


def add_routes(hub: FlowHub) -> Callable[[web.Application], None]:
    def register(app: web.Application) -> None:
        app[HUB_KEY] = hub
        app[METRICS_KEY] = metrics_registry(hub)
        app.router.add_get("/metrics", get_metrics)
        app.router.add_get("/v1/flows", get_flows)
        app.router.add_get("/v1/flows/stats", get_stats)

    return register
