"""trace_datapath and divergence: verdicts from what the datapath holds, never from the intent in its place."""

from __future__ import annotations

from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict
from ciliary.operator.policy import divergence, tracing

RULE = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="default", name="web", rule_index=0,
                       section="ingress[0]")
WEB = PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW, rules=(RULE,))


def node(name: str, *endpoints: intents.EndpointIntent, revision: int = 3) -> intents.NodeIntent:
    cache = (intents.IpcacheEntry(cidr="10.0.1.2/32", identity=1001), intents.IpcacheEntry(cidr="10.0.2.2/32",
                                                                                         identity=1002))
    return intents.NodeIntent(node=name, revision=revision, endpoints=endpoints, ipcache=cache)


NOT_ENFORCED = DirectionPolicy()


def client(egress: DirectionPolicy = NOT_ENFORCED) -> intents.EndpointIntent:
    return intents.EndpointIntent(namespace="default", pod="client", ipv4="10.0.1.2", identity=1001, egress=egress)


def server(*entries: PolicyEntry, enforced: bool = True) -> intents.EndpointIntent:
    return intents.EndpointIntent(namespace="default", pod="server", ipv4="10.0.2.2", identity=1002,
                                  ingress=DirectionPolicy(enforced=enforced, entries=entries))


PUBLISHED = {"n1": node("n1", client()), "n2": node("n2", server(WEB))}


def test_agreeing_datapath_gives_the_intents_verdict_without_warnings() -> None:
    result = tracing.trace_datapath(PUBLISHED, dict(PUBLISHED), "default/client", "default/server", 80, "tcp")
    assert result.verdict == "ALLOWED" and result.differences == () and not result.unreachable
    ingress = result.directions[1]
    assert ingress.source == "datapath" and ingress.trace is not None and ingress.trace.rules == (RULE,)
    assert "from the datapath of n1, n2" in result.describe() and "WARNING" not in result.describe()
    # the kind of entry the kernel's lookup finds (the peer's identity and port 80): kept through the datapath path
    assert ingress.trace.match == "l3-l4" and "; matched l3-l4)" in result.describe()
    assert tracing.trace_datapath(PUBLISHED, dict(PUBLISHED), "default/client", "default/server", 81).verdict == \
        "DENIED"


def test_an_intent_the_node_could_not_apply_is_traced_as_the_kernel_holds_it_and_flagged() -> None:
    old = node("n2", server(), revision=2)  # still default deny: the new allow never made it into the maps
    result = tracing.trace_datapath(PUBLISHED, {"n1": PUBLISHED["n1"], "n2": old}, "default/client",
                                    "default/server", 80, "tcp")
    assert result.verdict == "DENIED" and result.intent.verdict == "ALLOWED"
    assert result.differences and "n2: default/server (10.0.2.2) ingress" in result.differences[0]
    assert "allow identity 1001 TCP port 80" in result.differences[0]
    text = result.describe()
    assert text.startswith("DENIED") and "WARNING: the datapath differs from the operator's intent (which says " \
                                         "ALLOWED)" in text


def test_an_unreadable_node_is_unknown_never_the_intent() -> None:
    result = tracing.trace_datapath(PUBLISHED, {"n1": PUBLISHED["n1"], "n2": "the agent did not answer"},
                                    "default/client", "default/server", 80, "tcp")
    assert result.verdict == "UNKNOWN" and result.unreachable == {"n2": "the agent did not answer"}
    assert result.directions[1].trace is None and result.directions[1].source == "unreachable"
    assert "UNKNOWN (the node's datapath could not be read: the agent did not answer)" in result.describe()
    # a direction the datapath denies decides even when the other one is unknown
    denying = {"n1": node("n1", client(DirectionPolicy(enforced=True))), "n2": "down"}
    assert tracing.trace_datapath(PUBLISHED, denying, "default/client", "default/server", 80).verdict == "DENIED"


def test_an_endpoint_missing_from_the_datapath_passes_everything_and_is_flagged() -> None:
    result = tracing.trace_datapath(PUBLISHED, {"n1": PUBLISHED["n1"], "n2": node("n2")}, "default/client",
                                    "default/server", 81, "tcp")
    assert result.verdict == "ALLOWED" and result.intent.verdict == "DENIED"
    assert result.directions[1].source == "not-in-datapath"
    assert any("is not in the datapath's endpoint map" in d for d in result.differences)


def test_divergence_by_meaning() -> None:
    split = [PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=80, port_high=89, verdict=Verdict.ALLOW),
             PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=90, port_high=99, verdict=Verdict.ALLOW)]
    whole = PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=80, port_high=99, verdict=Verdict.ALLOW)
    assert divergence.differences(node("n", server(*split)), node("n", server(whole))) == []
    assert divergence.differences(node("n", server(whole)), node("n", server(whole, enforced=False))) == [
        "default/server (10.0.2.2) ingress: not enforced in the datapath, enforced in the intent"]
    icmp0 = PolicyEntry(identity=0, protocol=Protocol.ICMP, icmp_type=0, verdict=Verdict.ALLOW)
    icmp_any = PolicyEntry(identity=0, protocol=Protocol.ICMP, verdict=Verdict.ALLOW)
    assert divergence.differences(node("n", server(icmp0)), node("n", server(icmp_any))) == [
        "default/server (10.0.2.2) ingress: the datapath holds allow any peer ICMP type any; "
        "the intent wants allow any peer ICMP type 0"]
    stale = node("n", server(), client())
    assert divergence.differences(node("n", server()), stale) == [
        "default/client (10.0.1.2) is in the datapath but not in the intent"]
    moved = intents.NodeIntent(node="n", revision=1, endpoints=(server(),),
                               ipcache=(intents.IpcacheEntry(cidr="10.0.1.2/32", identity=1009),))
    assert any("ipcache 10.0.1.2/32: identity 1009 in the datapath" in d
               for d in divergence.differences(node("n", server()), moved))
    assert divergence.differences(node("n", server()), moved, endpoints=["10.0.2.2"], peers=["10.0.1.2"]) == [
        "10.0.1.2 resolves to identity 1009 in the datapath, 1001 in the intent"]
    assert divergence.differences(node("n", server()), moved, endpoints=["10.0.2.2"], peers=["10.0.2.2"]) == []
