"""The agent's Hubble-compatible gRPC server (the async shell over ``hubble_query`` and the flow ring).

Serves on ``--hubble-addr`` (mutual TLS off loopback, as ``observer_tls`` decides) and, plaintext, on the
optional unix socket ``--hubble-socket``:

- ``observer.Observer``: ``GetFlows`` (history from the agent's flow ring, then, with ``follow``,
  every new flow; a follower that reads too slowly loses flows, counted in ``ServerStatus`` and
  reported in-stream as ``lost_events`` from OBSERVER_EVENTS_QUEUE), ``ServerStatus``,
  ``GetNodes`` (this node), ``GetNamespaces`` (namespaces of local pods and of the peers in the ring);
- ``peer.Peer/Notify``: this node only (the relay learns every node from etcd, not from agents);
- ``grpc.health.v1.Health``: SERVING for "" and ``hubble.server.Observer`` (``hubble status`` asks).

A request the filters cannot honour ends with INVALID_ARGUMENT and a message naming the field;
nothing else in the agent is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ciliary.hubbleapi import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2
from ciliary.nodeagent import flowapi, hubble_convert, hubble_filter, hubble_query, observer_tls

log = logging.getLogger(__name__)

HEALTH_SERVICE = "hubble.server.Observer"
FOLLOW_QUEUE = 16384
BATCH = 512
VERSION_PREFIX = "ciliary"


def version() -> str:
    from ciliary.nodeagent.registration import agent_version

    return f"{VERSION_PREFIX}-{agent_version()}"


def lost_response(node: str, count: int) -> observer_pb2.GetFlowsResponse:
    now = hubble_convert.timestamp(time.time())
    return observer_pb2.GetFlowsResponse(
        lost_events=flow_pb2.LostEvent(source=flow_pb2.OBSERVER_EVENTS_QUEUE, num_events_lost=count),
        node_name=node, time=now)


class FlowRate:
    """Flows per second over the last minute, from the hub's ``seen`` counter."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def rate(self, seen: int) -> float:
        now = time.monotonic()
        self.samples = [(t, n) for t, n in self.samples if now - t <= 60] + [(now, seen)]
        t0, n0 = self.samples[0]
        return (seen - n0) / (now - t0) if now > t0 else 0.0


class ObserverService(observer_pb2_grpc.ObserverServicer):
    def __init__(self, hub: flowapi.FlowHub, address: str, *, tls: bool = False) -> None:
        self.hub = hub
        self.address = address
        self.tls = tls
        self.rate = FlowRate()

    async def GetFlows(self, request: observer_pb2.GetFlowsRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[observer_pb2.GetFlowsResponse | bytes]:
        try:
            query = hubble_query.plan(request)
        except hubble_filter.FilterError as exc:
            log.info("GetFlows refused", extra={"error": str(exc), "peer": context.peer()})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        node = self.hub.node
        with self.hub.follow_entries(FOLLOW_QUEUE) if query.follow else _no_queue() as queue:
            for entry in query.history_entries(list(self.hub.ring)):
                yield self._response(query, entry)
            if queue is None:
                return
            reported = 0
            while True:
                if query.until_ns is None:
                    batch = [await queue.get()]
                else:  # a followed stream with `until` ends once the clock passes it, flows or not
                    left = query.until_ns / 1e9 - time.time()
                    if left < 0:
                        return
                    try:
                        batch = [await asyncio.wait_for(queue.get(), min(left + 0.001, 1.0))]
                    except TimeoutError:
                        continue
                while not queue.empty() and len(batch) < BATCH:
                    batch.append(queue.get_nowait())
                if queue.lost > reported:
                    yield lost_response(node, queue.lost - reported)
                    reported = queue.lost
                for entry in batch:
                    if query.until_ns is None and not query.may_want(entry):
                        continue  # cannot match: not converted (with `until`, every flow's time is read)
                    flow = hubble_query.flow_of(entry)
                    if query.past_until(flow):
                        return
                    if query.wants(flow):
                        yield self._response(query, entry)

    def _response(self, query: hubble_query.FlowQuery, entry: Any) -> observer_pb2.GetFlowsResponse | bytes:
        """A flow's response: its cached serialized form (``hubble_query.response_wire``), or with a field mask
        a message of the kept fields (``add_observer`` sends either)."""
        if query.mask is None:
            return hubble_query.response_wire(entry, self.hub.node)
        flow = entry.flow
        return observer_pb2.GetFlowsResponse(flow=query.shape(flow), node_name=self.hub.node, time=flow.time)

    def status(self) -> observer_pb2.ServerStatusResponse:
        return observer_pb2.ServerStatusResponse(
            num_flows=len(self.hub.ring), max_flows=self.hub.ring.maxlen or 0, seen_flows=self.hub.seen,
            uptime_ns=int((time.time() - self.hub.started) * 1e9), version=version(),
            flows_rate=self.rate.rate(self.hub.seen))

    async def ServerStatus(self, request: observer_pb2.ServerStatusRequest,
                           context: grpc.aio.ServicerContext) -> observer_pb2.ServerStatusResponse:
        return self.status()

    def node(self) -> observer_pb2.Node:
        return observer_pb2.Node(name=self.hub.node, version=version(), address=self.address,
                                 state=relay_pb2.NODE_CONNECTED, tls=observer_pb2.TLS(enabled=self.tls),
                                 uptime_ns=int((time.time() - self.hub.started) * 1e9),
                                 num_flows=len(self.hub.ring), max_flows=self.hub.ring.maxlen or 0,
                                 seen_flows=self.hub.seen)

    async def GetNodes(self, request: observer_pb2.GetNodesRequest,
                       context: grpc.aio.ServicerContext) -> observer_pb2.GetNodesResponse:
        return observer_pb2.GetNodesResponse(nodes=[self.node()])

    def namespaces(self) -> set[str]:
        names = {ns for ns, _pod in self.hub.index.pods.values()}
        identities: set[int] = set()
        for entry in list(self.hub.ring):
            identities.add(entry.event.src_identity)
            identities.add(entry.event.dst_identity)
        for identity in identities:
            for label in self.hub.index.labels.get(identity, ()):
                if label.startswith(flowapi.NAMESPACE_LABEL) or label.startswith("k8s:" + flowapi.NAMESPACE_LABEL):
                    names.add(label.split("=", 1)[1])
        names.discard("")
        return names

    async def GetNamespaces(self, request: observer_pb2.GetNamespacesRequest,
                            context: grpc.aio.ServicerContext) -> observer_pb2.GetNamespacesResponse:
        return observer_pb2.GetNamespacesResponse(
            namespaces=[observer_pb2.Namespace(namespace=ns) for ns in sorted(self.namespaces())])


class _no_queue:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class SelfPeer(peer_pb2_grpc.PeerServicer):
    """``peer.Peer/Notify`` on an agent: this node, then nothing until the client leaves."""

    def __init__(self, node: str, address: str) -> None:
        self.node = node
        self.address = address

    async def Notify(self, request: peer_pb2.NotifyRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[peer_pb2.ChangeNotification]:
        yield peer_pb2.ChangeNotification(name=self.node, address=self.address, type=peer_pb2.PEER_ADDED)
        await asyncio.Event().wait()  # until the client cancels


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer: Any) -> None:
    for name in ("", HEALTH_SERVICE):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def listen(server: grpc.aio.Server, address: str, what: str,
           credentials: grpc.ServerCredentials | None = None) -> None:
    """Add a port (TLS with ``credentials``, else plaintext); a taken or invalid address is an OSError naming
    ``what``."""
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:  # grpc raises when the address is taken
        raise OSError(f"cannot listen on {address} ({what}): {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address} ({what})")


def _wire(response: observer_pb2.GetFlowsResponse | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_observer(servicer: ObserverService, server: grpc.aio.Server) -> None:
    """``observer.Observer`` as the generated ``add_ObserverServicer_to_server`` registers it, except that
    GetFlows may yield already serialized responses (bytes), which are sent as they are."""
    messages = observer_pb2
    handlers = {
        "GetFlows": grpc.unary_stream_rpc_method_handler(
            servicer.GetFlows, request_deserializer=messages.GetFlowsRequest.FromString, response_serializer=_wire),
        "GetNodes": grpc.unary_unary_rpc_method_handler(
            servicer.GetNodes, request_deserializer=messages.GetNodesRequest.FromString,
            response_serializer=messages.GetNodesResponse.SerializeToString),
        "GetNamespaces": grpc.unary_unary_rpc_method_handler(
            servicer.GetNamespaces, request_deserializer=messages.GetNamespacesRequest.FromString,
            response_serializer=messages.GetNamespacesResponse.SerializeToString),
        "ServerStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ServerStatus, request_deserializer=messages.ServerStatusRequest.FromString,
            response_serializer=messages.ServerStatusResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("observer.Observer", handlers),))
    server.add_registered_method_handlers("observer.Observer", handlers)


async def start(hub: flowapi.FlowHub, address: str, *, tls: observer_tls.ServerTLS | None = None,
                insecure: bool = False, socket: str = "") -> grpc.aio.Server:
    """Serve the Observer, Peer and Health services on ``address`` (HOST:PORT; mutual TLS unless loopback or
    ``insecure``, ``observer_tls.server_mode``) and, plaintext, on the unix socket ``socket`` when given;
    returns the started server. An address that may not be served as configured is an OSError."""
    try:
        mode = observer_tls.server_mode(address, tls, insecure=insecure)
    except observer_tls.ObserverTLSError as exc:
        raise OSError(str(exc)) from exc
    credentials = observer_tls.server_credentials(tls) if mode is observer_tls.Mode.TLS and tls else None
    server = grpc.aio.server()
    add_observer(ObserverService(hub, address, tls=credentials is not None), server)
    peer_pb2_grpc.add_PeerServicer_to_server(SelfPeer(hub.node, address), server)
    await set_serving(add_health(server))
    listen(server, address, "Hubble Observer API", credentials)
    if socket:
        listen(server, f"unix:{socket}", "Hubble Observer API (local socket)")
    await server.start()
    if credentials is None and not observer_tls.is_local(address):
        log.warning(observer_tls.INSECURE_WARNING, extra={"node": hub.node, "address": address})
    log.info("Hubble Observer API serving", extra={"node": hub.node, "address": address, "mode": mode.value,
                                                  "socket": socket})
    return server
