"""What the Hubble relay computes from its peers' answers (pure: no gRPC, no etcd).

- :func:`peers_from_records`: node name -> Observer address, from the agents' registration
  records in etcd (``/ciliary/nodes/v1/<node>``, field ``observerAddr``; a node without one
  serves no Observer API and is left out);
- :func:`merge_history`: the flows of every node in time order; as with Hubble Relay, ``number``
  applies per node (each node answers with its N flows), not to the merged stream;
- :func:`merge_status`: one ServerStatus for the cluster (sums, connected/unavailable nodes);
- :func:`peer_changes`: the Peer notifications that turn one peer set into the next.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from ciliary.hubbleapi import observer_pb2, peer_pb2


def peers_from_records(records: Iterable[bytes | str]) -> dict[str, str]:
    peers: dict[str, str] = {}
    for raw in records:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        name, address = record.get("name"), record.get("observerAddr")
        if isinstance(name, str) and name and isinstance(address, str) and address:
            peers[name] = address
    return peers


def _key(response: observer_pb2.GetFlowsResponse) -> tuple[int, int, str]:
    return response.time.seconds, response.time.nanos, response.node_name


def merge_history(per_node: Iterable[Sequence[observer_pb2.GetFlowsResponse]]) -> list[observer_pb2.GetFlowsResponse]:
    """Every node's flow responses, oldest first."""
    return sorted((r for responses in per_node for r in responses if r.HasField("flow")), key=_key)


def merge_status(statuses: Mapping[str, observer_pb2.ServerStatusResponse], unavailable: Sequence[str],
                 version: str) -> observer_pb2.ServerStatusResponse:
    out = observer_pb2.ServerStatusResponse(version=version)
    for status in statuses.values():
        out.num_flows += status.num_flows
        out.max_flows += status.max_flows
        out.seen_flows += status.seen_flows
        out.flows_rate += status.flows_rate
        out.uptime_ns = max(out.uptime_ns, status.uptime_ns)
    out.num_connected_nodes.value = len(statuses)
    out.num_unavailable_nodes.value = len(unavailable)
    out.unavailable_nodes.extend(sorted(unavailable))
    return out


def peer_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[peer_pb2.ChangeNotification]:
    changes = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            changes.append(peer_pb2.ChangeNotification(name=name, address=before[name],
                                                       type=peer_pb2.PEER_DELETED))
        elif name not in before:
            changes.append(peer_pb2.ChangeNotification(name=name, address=after[name], type=peer_pb2.PEER_ADDED))
        elif before[name] != after[name]:
            changes.append(peer_pb2.ChangeNotification(name=name, address=after[name],
                                                       type=peer_pb2.PEER_UPDATED))
    return changes
