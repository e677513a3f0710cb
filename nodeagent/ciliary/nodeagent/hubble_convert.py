"""Ciliary's flow events as Hubble ``flow.Flow`` messages (pure: no gRPC, no I/O).

What each Hubble field carries, and what Ciliary leaves empty:

- ``verdict`` FORWARDED or DROPPED, the verdict of the endpoint's tc program;
  ``drop_reason_desc`` and the numeric ``drop_reason`` use Cilium's drop codes for the
  closest Ciliary reason (:data:`DROP_CODES`);
- ``event_type``: a drop is Cilium monitor type 1 (sub type = drop code); a forwarded packet
  is a trace, type 4, observed at the endpoint: sub type 0 (to-endpoint) for ingress,
  5 (from-endpoint) for egress; ``trace_observation_point`` says the same;
- ``traffic_direction`` and ``is_reply`` (and the old ``reply``) from the datapath;
- ``source`` / ``destination``: identity and its labels, namespace from the local endpoint
  or the identity's namespace label, ``pod_name`` only for pods on this node (the agent knows
  no remote pod names), ``workloads`` empty (the intent carries no owner);
- policy names: the rules of the deciding policy entry go to ``ingress/egress_allowed_by``
  (verdict FORWARDED) or ``ingress/egress_denied_by`` (a deny rule); a default-deny drop, a
  reply and unenforced traffic name no policy;
- ``policy_match_type``: the kind of entry that decided (Hubble's numbers: 1 L3-Only, 2 L3-L4, 3 L4-Only,
  4 all, 5 L3-Proto, 6 Proto-Only; the datapath's ``CY_MATCH_*``), unset when none did;
- ``node_name``, ``Type`` L3_L4, ``IP``, ``l4`` (ports, TCP flags, ICMP type), ``interface``, and
  ``Summary`` (``TCP Flags: SYN``, ``ICMPv4 EchoRequest``: the text the CLI's compact output shows).
- L7 flows (``l7_flows.L7Event``, an HTTP request judged by the node's proxy): ``Type`` L7 and
  ``l7.http`` (code, method, url, protocol), ``latency_ns``; DROPPED when answered 403.
- ``destination_service`` (``source_service`` on a reply): the Service whose frontend a pod's socket asked
  for when it opened the connection (the socket load balancer translated it to the backend the flow
  shows; ``flows.FlowEvent.frontend``), named by the load-balancing intent in force when read
  (``IntentIndex.service_of``); unset for connections not opened through a frontend, on the backend's
  side, and when no Service has that frontend any more.
- Left empty: ethernet, DNS names, trace contexts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from google.protobuf import timestamp_pb2, wrappers_pb2

from ciliary.hubbleapi import flow_pb2
from ciliary.operator import intents

EMITTER = "Ciliary"
MATCH_TYPES = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all", 5: "l3-proto", 6: "proto-only"}
"""Hubble's names of the policy match types (``policy_match_type``; lower case as in
``hubble_policy_verdicts_total``'s ``match`` label): l3 = the peer's identity was named, l4 = a port,
proto = a protocol with any port, all = none of them (consts.h ``CY_MATCH_*``)."""
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_L7 = 129
"""Cilium's monitor type of an L7 (proxy access log) record."""
TRACE_TO_ENDPOINT = 0
TRACE_FROM_ENDPOINT = 5

DROP_CODES: dict[str, int] = {
    "DROP_POLICY": flow_pb2.POLICY_DENIED,
    "DROP_POLICY_DENY": flow_pb2.POLICY_DENY,
    "DROP_INVALID": flow_pb2.INVALID_PACKET_DROPPED,
    "DROP_FRAGMENT": flow_pb2.IP_FRAGMENTATION_NOT_SUPPORTED,
    "DROP_INVALID_L3": flow_pb2.CT_TRUNCATED_OR_INVALID_HEADER,
    "DROP_UNSUPPORTED_L3": flow_pb2.UNSUPPORTED_L3_PROTOCOL,
    "DROP_SPOOFED_SOURCE": flow_pb2.INVALID_SOURCE_IP,
    "DROP_PROXY_UNAVAILABLE": flow_pb2.SOCKET_LOOKUP_FAILED,
}
"""Ciliary drop reason (``maps.Reason`` name) -> Cilium drop code (``flow.DropReason``)."""

TCP_FLAG_FIELDS = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
                   (0x40, "ECE"), (0x80, "CWR"))
ICMP4_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest", 11: "TimeExceeded"}
NAMESPACE_LABEL = "io.kubernetes.pod.namespace="
ENDPOINT_CACHE_MAX = 65536


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)


def hubble_labels(labels: Iterable[str]) -> list[str]:
    """Identity labels in Hubble's ``source:key=value`` form (``k8s:`` when no source is given)."""
    out = []
    for label in labels:
        key = label.split("=", 1)[0]
        out.append(label if ":" in key else f"k8s:{label}")
    return out


def policy_of(rule: intents.RuleRef, revision: int) -> flow_pb2.Policy:
    return flow_pb2.Policy(name=rule.name, namespace=rule.namespace, kind=rule.kind, revision=revision,
                           labels=[f"k8s:io.cilium.k8s.policy.name={rule.name}",
                                   *([f"k8s:io.cilium.k8s.policy.namespace={rule.namespace}"]
                                     if rule.namespace else [])])


def _endpoint(index: Any, ip: str, identity: int) -> flow_pb2.Endpoint:
    """The Endpoint message of (ip, identity) under ``index``, built once and kept on the index
    (``IntentIndex.hubble_endpoints``), so it never outlives the intent it was read from."""
    cache = getattr(index, "hubble_endpoints", None)
    cached = cache.get((ip, identity)) if cache is not None else None
    if cached is not None:
        return cached
    labels = index.labels.get(identity, ())
    namespace, pod = index.pods.get(ip, ("", ""))
    if not namespace:
        namespace = next((label.split(NAMESPACE_LABEL, 1)[1] for label in labels if NAMESPACE_LABEL in label), "")
    endpoint = flow_pb2.Endpoint(identity=identity, namespace=namespace, pod_name=pod, labels=hubble_labels(labels))
    if cache is not None and len(cache) < ENDPOINT_CACHE_MAX:
        cache[(ip, identity)] = endpoint
    return endpoint


def to_flow(event: Any, index: Any, rules: Iterable[intents.RuleRef], revision: int = 0) -> flow_pb2.Flow:
    """One ``datapath.flows.FlowEvent`` (with the ``flowapi.IntentIndex`` in force) as a ``flow.Flow``."""
    reason = getattr(event.reason, "name", str(event.reason))
    dropped = str(event.verdict).lower() == "dropped"
    ingress = event.direction == "ingress"
    src, dst = str(event.src), str(event.dst)  # each formatted once (ipaddress's __str__ is slow)
    flow = flow_pb2.Flow(
        time=timestamp(event.time), emitter=flow_pb2.Emitter(name=EMITTER), node_name=index.node,
        verdict=flow_pb2.DROPPED if dropped else flow_pb2.FORWARDED, Type=flow_pb2.L3_L4,
        traffic_direction=flow_pb2.INGRESS if ingress else flow_pb2.EGRESS,
        reply=bool(event.is_reply), is_reply=wrappers_pb2.BoolValue(value=bool(event.is_reply)),
        source=_endpoint(index, src, event.src_identity),
        destination=_endpoint(index, dst, event.dst_identity),
        interface=flow_pb2.NetworkInterface(index=event.ifindex),
        policy_match_type=getattr(event, "match_type", 0),
    )
    version = flow_pb2.IPv6 if isinstance(event.src, ipaddress.IPv6Address) else flow_pb2.IPv4
    flow.IP.CopyFrom(flow_pb2.IP(source=src, destination=dst, ipVersion=version))
    if dropped:
        code = DROP_CODES.get(reason, flow_pb2.DROP_REASON_UNKNOWN)
        flow.drop_reason = code
        flow.drop_reason_desc = code  # type: ignore[assignment]
        flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=EVENT_DROP, sub_type=code))
    else:
        flow.event_type.CopyFrom(flow_pb2.CiliumEventType(
            type=EVENT_TRACE, sub_type=TRACE_TO_ENDPOINT if ingress else TRACE_FROM_ENDPOINT))
        flow.trace_observation_point = flow_pb2.TO_ENDPOINT if ingress else flow_pb2.FROM_ENDPOINT
    proto = event.protocol
    frontend = getattr(event, "frontend", None)
    if frontend is not None and (service := index.service_of(frontend[0], frontend[1], proto)):
        namespace, _, name = service.partition("/")
        (flow.source_service if event.is_reply else flow.destination_service).CopyFrom(
            flow_pb2.Service(name=name, namespace=namespace))
    if proto == 6:
        names = [name for bit, name in TCP_FLAG_FIELDS if event.tcp_flags & bit]
        flags = flow_pb2.TCPFlags(**{name: True for name in names})
        flow.l4.TCP.CopyFrom(flow_pb2.TCP(source_port=event.sport, destination_port=event.dport, flags=flags))
        flow.Summary = "TCP Flags: " + ", ".join(names)
    elif proto == 17:
        flow.l4.UDP.CopyFrom(flow_pb2.UDP(source_port=event.sport, destination_port=event.dport))
        flow.Summary = "UDP"
    elif proto == 132:
        flow.l4.SCTP.CopyFrom(flow_pb2.SCTP(source_port=event.sport, destination_port=event.dport))
        flow.Summary = "SCTP"
    elif proto == 1:
        flow.l4.ICMPv4.CopyFrom(flow_pb2.ICMPv4(type=event.sport))
        flow.Summary = "ICMPv4 " + ICMP4_TYPES.get(event.sport, f"type {event.sport}")
    elif proto == 58:
        flow.l4.ICMPv6.CopyFrom(flow_pb2.ICMPv6(type=event.sport))
        flow.Summary = f"ICMPv6 type {event.sport}"
    http = getattr(event, "http", None)
    l7 = getattr(event, "l7", None)
    if http is not None:  # an L7 flow (l7_flows.L7Event): the request the node's proxy judged
        flow.Type = flow_pb2.L7
        flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=EVENT_L7))
        flow.l7.CopyFrom(flow_pb2.Layer7(type=flow_pb2.REQUEST, latency_ns=http.duration_ms * 1_000_000,
                                         http=flow_pb2.HTTP(code=http.code, method=http.method, url=http.url,
                                                            protocol=http.protocol)))
        flow.Summary = f"{http.protocol} {http.method} {http.url} => {http.code}"
        rules = [event.rule] if event.rule is not None else []
    elif l7 and l7.get("type") == "dns":
        _dns(flow, l7)
    policies = [policy_of(rule, revision) for rule in rules]
    if policies:
        if not dropped:
            (flow.ingress_allowed_by if ingress else flow.egress_allowed_by).extend(policies)
        elif reason == "DROP_POLICY_DENY":
            (flow.ingress_denied_by if ingress else flow.egress_denied_by).extend(policies)
    return flow


RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def _dns(flow: flow_pb2.Flow, l7: dict[str, Any]) -> None:
    """A DNS exchange seen by the node's DNS proxy (``dns_proxy.L7FlowEvent``) as Hubble's ``Flow.l7.dns``."""
    flow.Type = flow_pb2.L7
    flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=EVENT_L7))
    rcode = str(l7.get("rcode", ""))
    flow.l7.CopyFrom(flow_pb2.Layer7(
        type=flow_pb2.RESPONSE, latency_ns=int(float(l7.get("latency_ms", 0)) * 1_000_000),
        dns=flow_pb2.DNS(query=str(l7.get("query", "")) + ".", ips=list(l7.get("ips", ())),
                         ttl=int(l7.get("ttl", 0)), observation_source="proxy", rcode=RCODES.get(rcode, 0),
                         qtypes=[str(l7.get("qtype", ""))], rrtypes=["A"] if l7.get("ips") else [])))
    flow.Summary = f"DNS Answer {rcode} {l7.get('query', '')} {','.join(l7.get('ips', ()))}".rstrip()
