"""The Hubble relay: pure merging (relay_merge) and the gRPC relay over two in-process agent Observer
servers on loopback (history merged in time order, N per node, follow, an unreachable node,
INVALID_ARGUMENT before any node is asked, status, nodes, namespaces, peers)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ciliary.hubbleapi import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2
from ciliary.nodeagent import flowapi, hubble_convert, observer_server
from ciliary.operator import intents, relay, relay_merge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodeagent"))
from test_hubble_convert import event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_peers_from_records_skip_nodes_without_an_observer() -> None:
    records = [json.dumps({"name": "n1", "observerAddr": "127.0.0.1:1"}), json.dumps({"name": "n2", "observerAddr": ""}),
               json.dumps({"name": "n3"}), b"not json", json.dumps(["x"])]
    assert relay_merge.peers_from_records(records) == {"n1": "127.0.0.1:1"}


def test_merge_history_orders_by_time() -> None:
    def response(node: str, second: int) -> observer_pb2.GetFlowsResponse:
        flow = flow_pb2.Flow(node_name=node)
        flow.time.seconds = second
        return observer_pb2.GetFlowsResponse(flow=flow, node_name=node, time=flow.time)

    a = [response("a", s) for s in (1, 4, 5)]
    b = [response("b", s) for s in (2, 3, 6)]
    assert [r.time.seconds for r in relay_merge.merge_history([a, b])] == [1, 2, 3, 4, 5, 6]


def test_merge_status_and_peer_changes() -> None:
    s = observer_pb2.ServerStatusResponse(num_flows=3, max_flows=10, seen_flows=7)
    merged = relay_merge.merge_status({"a": s, "b": s}, ["c"], "v")
    assert (merged.num_flows, merged.max_flows, merged.seen_flows) == (6, 20, 14)
    assert merged.num_connected_nodes.value == 2 and list(merged.unavailable_nodes) == ["c"]
    changes = relay_merge.peer_changes({"a": "x", "b": "y"}, {"b": "z", "c": "w"})
    assert [(c.name, c.type) for c in changes] == [("a", peer_pb2.PEER_DELETED), ("b", peer_pb2.PEER_UPDATED),
                                                   ("c", peer_pb2.PEER_ADDED)]


@pytest.fixture
async def cluster():  # type: ignore[no-untyped-def]
    hubs, servers, peers = [], [], relay.Peers()
    for node, base in (("n1", 1700000000), ("n2", 1700000000.5)):
        hub = flowapi.FlowHub(node, capacity=64)
        hub.set_intent(intents.NodeIntent(node=node, revision=1, endpoints=(intents.EndpointIntent(
            namespace=f"ns-{node}", pod="p", ipv4="10.0.0.2", identity=300),)))
        hub.publish([event(sport=n, t=base + n) for n in range(5)])
        address = f"127.0.0.1:{free_port()}"
        servers.append(await observer_server.start(hub, address))
        hubs.append(hub)
        await peers.set({**peers.current, node: address})
    await peers.set({**peers.current, "gone": f"127.0.0.1:{free_port()}"})  # nothing listens there
    relay_address = f"127.0.0.1:{free_port()}"
    relay_server = await relay.start(peers, relay_address)
    channel = grpc.aio.insecure_channel(relay_address)
    try:
        yield hubs, channel, peers
    finally:
        await channel.close()
        await relay_server.stop(grace=None)
        for server in servers:
            await server.stop(grace=None)
        await peers.close()


async def test_relay_merges_nodes(cluster) -> None:  # type: ignore[no-untyped-def]
    hubs, channel, _ = cluster
    stub = observer_pb2_grpc.ObserverStub(channel)
    got = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=4))]
    assert got[0].HasField("node_status") and got[0].node_status.state_change == relay_pb2.NODE_UNAVAILABLE
    assert list(got[0].node_status.node_names) == ["gone"]
    flows = [r for r in got if r.HasField("flow")]
    # like Hubble Relay: the last N of each node, merged in time order
    assert [(r.node_name, r.flow.l4.TCP.source_port) for r in flows] == [
        ("n1", 1), ("n2", 1), ("n1", 2), ("n2", 2), ("n1", 3), ("n2", 3), ("n1", 4), ("n2", 4)]
    only_n1 = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(
        whitelist=[flow_pb2.FlowFilter(destination_pod=["ns-n1/"])]))]
    assert {r.node_name for r in only_n1 if r.HasField("flow")} == {"n1"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(
            whitelist=[flow_pb2.FlowFilter(source_ip=["nope"])]))]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "source_ip" in info.value.details()
    status = await stub.ServerStatus(observer_pb2.ServerStatusRequest())
    assert (status.num_flows, status.num_connected_nodes.value, list(status.unavailable_nodes)) == (10, 2, ["gone"])
    nodes = (await stub.GetNodes(observer_pb2.GetNodesRequest())).nodes
    assert [(n.name, n.state) for n in nodes] == [("gone", relay_pb2.NODE_UNAVAILABLE),
                                                  ("n1", relay_pb2.NODE_CONNECTED), ("n2", relay_pb2.NODE_CONNECTED)]
    namespaces = (await stub.GetNamespaces(observer_pb2.GetNamespacesRequest())).namespaces
    assert [n.namespace for n in namespaces] == ["ns-n1", "ns-n2"]
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
        service="hubble.server.Observer"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_relay_follows_every_node_and_announces_peers(cluster) -> None:  # type: ignore[no-untyped-def]
    hubs, channel, peers = cluster
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(
        follow=True, whitelist=[flow_pb2.FlowFilter(destination_port=["443"])]))
    for _ in range(250):  # bounded: until both agents have the relay as follower
        if all(h.stats()["followers"] for h in hubs):
            break
        await asyncio.sleep(0.02)
    for hub in hubs:
        hub.publish([event(dport=80), event(dport=443, sport=99)])
    got: list[observer_pb2.GetFlowsResponse] = []
    while len([r for r in got if r.HasField("flow")]) < 2:
        got.append(await asyncio.wait_for(call.read(), 5))
    assert sorted(r.node_name for r in got if r.HasField("flow")) == ["n1", "n2"]
    call.cancel()
    notify = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest())
    first = [await asyncio.wait_for(notify.read(), 5) for _ in range(3)]
    assert sorted(c.name for c in first) == ["gone", "n1", "n2"]
    await peers.set({k: v for k, v in peers.current.items() if k != "gone"})
    change = await asyncio.wait_for(notify.read(), 5)
    assert (change.name, change.type) == ("gone", peer_pb2.PEER_DELETED)
    notify.cancel()


async def test_relay_follow_with_until_ends(cluster) -> None:  # type: ignore[no-untyped-def]
    _, channel, _ = cluster
    until = hubble_convert.timestamp(time.time() + 0.5)
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(follow=True, until=until))
    got = await asyncio.wait_for(_read_all(call), 10)
    assert [r.node_status.node_names for r in got if r.HasField("node_status")] == [["gone"]]
    assert not [r for r in got if r.HasField("flow")]


async def _read_all(call):  # type: ignore[no-untyped-def]
    return [r async for r in call]


async def test_relay_follow_picks_up_a_node_that_joins_later(cluster) -> None:  # type: ignore[no-untyped-def]
    hubs, channel, peers = cluster
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(
        follow=True, whitelist=[flow_pb2.FlowFilter(destination_port=["8443"])]))
    late = flowapi.FlowHub("n3", capacity=64)
    late.set_intent(intents.NodeIntent(node="n3", revision=1, endpoints=(intents.EndpointIntent(
        namespace="ns-n3", pod="p", ipv4="10.0.0.2", identity=300),)))
    address = f"127.0.0.1:{free_port()}"
    server = await observer_server.start(late, address)
    try:
        for _ in range(250):  # bounded: until the first two agents have the relay as follower
            if all(h.stats()["followers"] for h in hubs):
                break
            await asyncio.sleep(0.02)
        await peers.set({**peers.current, "n3": address})
        for _ in range(250):  # bounded: until the late agent has the relay as follower too
            if late.stats()["followers"]:
                break
            await asyncio.sleep(0.02)
        late.publish([event(dport=8443, sport=7)])
        got = await asyncio.wait_for(call.read(), 5)
        while not got.HasField("flow"):
            got = await asyncio.wait_for(call.read(), 5)
        assert got.node_name == "n3"
    finally:
        call.cancel()
        await server.stop(grace=None)


def test_a_relay_without_certificates_dials_only_loopback_peers_unless_insecure() -> None:
    """A peer off loopback without client certificates: refused before any channel is made (the node is then
    reported unavailable); ``--hubble-insecure`` dials it in plaintext."""
    from ciliary.nodeagent import observer_tls

    async def go() -> None:
        strict, loose = relay.Peers(), relay.Peers(insecure=True)
        try:
            strict.stub("n1", "127.0.0.1:4244")
            with pytest.raises(observer_tls.ObserverTLSError) as info:
                strict.stub("n2", "192.0.2.7:4244")
            assert info.value.address == "192.0.2.7:4244"
            loose.stub("n2", "192.0.2.7:4244")
            await strict.set({"n2": "192.0.2.7:4244"})
            nodes = await relay.RelayObserver(strict).GetNodes(observer_pb2.GetNodesRequest(), None)  # type: ignore[arg-type]
            assert [(n.name, n.state) for n in nodes.nodes] == [("n2", relay_pb2.NODE_UNAVAILABLE)]
        finally:
            await strict.close()
            await loose.close()

    asyncio.run(go())


def test_the_relay_parser_takes_all_three_tls_files_or_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("c", "k", "ca"):
        (tmp_path / name).write_text("x")
    with pytest.raises(SystemExit):
        relay.main(["--peer", "n=127.0.0.1:1", "--hubble-tls-cert-file", str(tmp_path / "c")])
    assert "is missing" in capsys.readouterr().err
