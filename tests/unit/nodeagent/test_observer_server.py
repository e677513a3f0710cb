"""The agent's Hubble gRPC server over a real loopback socket: GetFlows (history, filters, follow, lost
events, INVALID_ARGUMENT), ServerStatus, GetNodes, GetNamespaces, peer.Peer/Notify and gRPC health."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_hubble_convert import INTENT, event

from ciliary.hubbleapi import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc
from ciliary.nodeagent import flowapi, hubble_convert, observer_server
from ciliary.nodeagent.datapath import maps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def served():  # type: ignore[no-untyped-def]
    hub = flowapi.FlowHub("n1", capacity=64)
    hub.set_intent(INTENT)
    address = f"127.0.0.1:{free_port()}"
    server = await observer_server.start(hub, address)
    channel = grpc.aio.insecure_channel(address)
    try:
        yield hub, channel, address
    finally:
        await channel.close()
        await server.stop(grace=None)


async def collect(stream: object, limit: int = 1000) -> list[observer_pb2.GetFlowsResponse]:
    out = []
    async for item in stream:  # type: ignore[attr-defined]
        out.append(item)
        if len(out) >= limit:
            break
    return out


async def test_get_flows_history_filters_and_invalid_argument(served) -> None:  # type: ignore[no-untyped-def]
    hub, channel, _ = served
    hub.publish([event(sport=40000 + n) for n in range(10)] +
                [event("forwarded", maps.Reason.OK_POLICY, dport=443)])
    stub = observer_pb2_grpc.ObserverStub(channel)
    got = await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(number=3)))
    assert [r.flow.l4.TCP.destination_port for r in got] == [80, 80, 443]
    assert all(r.node_name == "n1" and r.time == r.flow.time for r in got)
    dropped = await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(whitelist=[
        flow_pb2.FlowFilter(destination_pod=["default/deathstar"], verdict=[flow_pb2.DROPPED])])))
    assert len(dropped) == 10 and {r.flow.verdict for r in dropped} == {flow_pb2.DROPPED}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(whitelist=[
            flow_pb2.FlowFilter(destination_port=["eighty"])])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "destination_port" in info.value.details()
    # the server is unaffected
    assert len(await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(number=1)))) == 1


async def test_follow_streams_new_matching_flows_and_reports_losses(served) -> None:  # type: ignore[no-untyped-def]
    hub, channel, _ = served
    stub = observer_pb2_grpc.ObserverStub(channel)
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, whitelist=[
        flow_pb2.FlowFilter(destination_port=["443"])]))
    for _ in range(100):  # bounded: until the follower is registered
        if hub.stats()["followers"]:
            break
        await asyncio.sleep(0.02)
    hub.publish([event(dport=80), event(dport=443, sport=1), event(dport=443, sport=2)])
    got = [await asyncio.wait_for(call.read(), 5) for _ in range(2)]
    assert [r.flow.l4.TCP.source_port for r in got] == [1, 2]
    # a follower that cannot keep up loses flows, and is told so in-stream
    queue = next(iter(hub._entry_followers))
    hub.publish([event(dport=443, sport=3)] * (queue.maxsize + 5))
    seen_lost = 0
    for _ in range(queue.maxsize + 10):
        r = await asyncio.wait_for(call.read(), 5)
        if r.HasField("lost_events"):
            seen_lost = r.lost_events.num_events_lost
            assert r.lost_events.source == flow_pb2.OBSERVER_EVENTS_QUEUE
            break
    assert seen_lost == 5 and hub.stats()["lost_followers"] == 5
    call.cancel()


async def test_status_nodes_namespaces_peer_and_health(served) -> None:  # type: ignore[no-untyped-def]
    hub, channel, address = served
    hub.publish([event() for _ in range(5)])
    stub = observer_pb2_grpc.ObserverStub(channel)
    status = await stub.ServerStatus(observer_pb2.ServerStatusRequest())
    assert (status.num_flows, status.max_flows, status.seen_flows) == (5, 64, 5)
    assert status.version.startswith("ciliary-") and status.uptime_ns > 0
    nodes = (await stub.GetNodes(observer_pb2.GetNodesRequest())).nodes
    assert [(n.name, n.address, n.num_flows) for n in nodes] == [("n1", address, 5)]
    namespaces = await stub.GetNamespaces(observer_pb2.GetNamespacesRequest())
    assert [n.namespace for n in namespaces.namespaces] == ["default"]
    peers = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest())
    first = await asyncio.wait_for(peers.read(), 5)
    assert (first.name, first.address, first.type) == ("n1", address, peer_pb2.PEER_ADDED)
    peers.cancel()
    check = health_pb2_grpc.HealthStub(channel).Check
    for service in ("", "hubble.server.Observer"):
        assert (await check(health_pb2.HealthCheckRequest(service=service))).status == \
            health_pb2.HealthCheckResponse.SERVING


async def test_taken_address_is_an_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="Hubble Observer API"):
            await observer_server.start(flowapi.FlowHub("n1"), f"127.0.0.1:{taken.getsockname()[1]}")


async def test_a_client_that_stops_reading_loses_counted_flows_and_others_are_served(served) -> None:  # type: ignore[no-untyped-def]
    hub, channel, address = served
    stalled = observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(follow=True))
    for _ in range(100):  # bounded: until the follower is registered
        if hub.stats()["followers"]:
            break
        await asyncio.sleep(0.02)
    burst = observer_server.FOLLOW_QUEUE + 5000
    for start in range(0, burst, 1000):  # the stalled client reads nothing
        hub.publish([event(sport=n % 60000) for n in range(start, min(burst, start + 1000))])
        await asyncio.sleep(0)
    for _ in range(250):  # bounded: the server's queue for the stalled client overflows
        if hub.stats()["lost_followers"] > 0:
            break
        await asyncio.sleep(0.02)
    assert hub.stats()["lost_followers"] > 0
    other = grpc.aio.insecure_channel(address)
    try:
        status = await asyncio.wait_for(observer_pb2_grpc.ObserverStub(other).ServerStatus(
            observer_pb2.ServerStatusRequest()), 5)
        assert status.seen_flows == burst
    finally:
        await other.close()
    stalled.cancel()


async def test_follow_with_until_ends_when_the_clock_passes_it(served) -> None:  # type: ignore[no-untyped-def]
    hub, channel, _ = served
    until = hubble_convert.timestamp(time.time() + 0.5)
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(follow=True, until=until))
    got = await asyncio.wait_for(collect(call), 5)  # no flow arrives: the stream still ends
    assert got == []


async def test_sent_again_from_the_cached_wire_form_and_masked_on_request(served) -> None:  # type: ignore[no-untyped-def]
    """A kept flow is serialized once (``RingEntry.wire``) and the bytes sent again are the same response;
    with a field mask the response carries only the named fields (never the cached whole flow)."""
    hub, channel, _ = served
    hub.publish([event(sport=41000 + n) for n in range(3)])
    stub = observer_pb2_grpc.ObserverStub(channel)
    first = await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(number=3)))
    assert all(entry.wire is not None for entry in list(hub.ring)[-3:])
    again = await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(number=3)))
    assert [r.SerializeToString() for r in again] == [r.SerializeToString() for r in first]
    expected = [observer_pb2.GetFlowsResponse(flow=e.flow, node_name="n1", time=e.flow.time) for e in list(hub.ring)[-3:]]
    assert first == expected
    masked = await collect(stub.GetFlows(observer_pb2.GetFlowsRequest(
        number=3, field_mask={"paths": ["verdict", "l4.TCP.source_port"]})))
    assert [r.flow.l4.TCP.source_port for r in masked] == [41000, 41001, 41002]
    assert all(not r.flow.source.labels and not r.flow.IP.source and r.flow.verdict == flow_pb2.DROPPED
               for r in masked)
