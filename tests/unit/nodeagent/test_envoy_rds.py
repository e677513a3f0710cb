"""Route discovery for the node's Envoy (``envoy_rds``): chains name their route configurations, a change of HTTP
rules or of a header value from a Secret leaves the LDS document byte-identical and rewrites only the route
configuration it changes, versions stay keyed, and the agent reports nothing enforced before Envoy acknowledged
every route configuration."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from test_envoy_egress import REF, SERVER, A, entry, node_intent  # type: ignore[import-not-found]

from ciliary.nodeagent import envoy_config, envoy_proxy, envoy_rds
from ciliary.operator import intents

SECRET = intents.SecretRef(namespace="default", name="tok")
PUBLIC = intents.HttpRule(method="GET", path="/public", rule=REF)
PRIVATE = intents.HttpRule(method="GET", path="/private", rule=REF)
CHAIN = f"egress {A}:80/id{SERVER}"


def docs(intent: intents.NodeIntent) -> envoy_config.Documents:
    return envoy_config.documents(intent, port=15001, access_log="/run/envoy/access.log", egress_port=15002)


def with_token(value: str, rule: intents.HttpRule = PUBLIC) -> intents.NodeIntent:
    rule = rule.model_copy(update={"header_matches": (intents.HeaderMatch(name="X-Token", secret=SECRET),)})
    return node_intent((entry(SERVER, http=(rule,)),)).model_copy(
        update={"header_secrets": {SECRET.key(): intents.HeaderSecret(value=value)}})


def hcms(listeners: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {chain["name"]: f["typed_config"] for listener in listeners["resources"]
            for chain in listener["filter_chains"] for f in chain["filters"]
            if f["name"] == "envoy.filters.network.http_connection_manager"}


def test_every_chain_names_its_route_configuration_delivered_from_its_own_file() -> None:
    found = docs(node_intent((entry(SERVER, http=(PUBLIC,)),)))
    managers = hcms(found.listeners)
    assert CHAIN in managers and set(managers) == set(found.routes)
    for name, hcm in managers.items():
        assert "route_config" not in hcm
        assert hcm["rds"]["route_config_name"] == name
        assert hcm["rds"]["config_source"]["path_config_source"]["path"] == \
            f"/run/envoy/rds/{envoy_rds.file_name(name)}"
        document = found.routes[name]
        assert [r["name"] for r in document["resources"]] == [name]  # Envoy takes one per file
        assert document["resources"][0]["@type"] == envoy_rds.ROUTE_CONFIG_TYPE
    routes = found.routes[CHAIN]["resources"][0]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes] == [envoy_config.route_name(REF), envoy_config.DENY_ROUTE]
    assert len({envoy_rds.file_name(n) for n in managers}) == len(managers)


def test_a_rules_only_change_leaves_the_lds_document_byte_identical() -> None:
    before, after = docs(node_intent((entry(SERVER, http=(PUBLIC,)),))), \
        docs(node_intent((entry(SERVER, http=(PRIVATE,)),)).model_copy(update={"revision": 8}))
    assert json.dumps(before.listeners) == json.dumps(after.listeners)
    assert before.version != after.version and after.version.startswith("8-")
    changed = {n for n in before.routes if before.routes[n] != after.routes[n]}
    assert changed == {CHAIN}
    assert before.routes[CHAIN]["version_info"] != after.routes[CHAIN]["version_info"]
    # an L4 allow instead of rules is a route change too: the chain stays
    l4 = docs(node_intent((entry(SERVER, http=None), entry(SERVER, http=(PUBLIC,)))))
    assert json.dumps(l4.listeners) == json.dumps(before.listeners)
    assert [r["name"] for r in l4.routes[CHAIN]["resources"][0]["virtual_hosts"][0]["routes"]][0] == "cy-allow"


def test_a_rotated_secret_changes_one_route_configuration_and_no_version_shows_the_value() -> None:
    one, two = docs(with_token("token-one")), docs(with_token("token-two"))
    assert json.dumps(one.listeners) == json.dumps(two.listeners)
    assert {n for n in one.routes if one.routes[n] != two.routes[n]} == {CHAIN}
    assert "token-two" in json.dumps(two.routes[CHAIN]) and "token-two" not in json.dumps(two.listeners)
    # versions are keyed digests (per agent process): equal content, equal version; no plain digest of it
    assert docs(with_token("token-two")).routes[CHAIN]["version_info"] == two.routes[CHAIN]["version_info"]
    import hashlib
    plain = hashlib.sha256(json.dumps(two.routes[CHAIN]["resources"][0], sort_keys=True).encode()).hexdigest()
    assert two.routes[CHAIN]["version_info"] not in plain and "token" not in two.version


def test_a_chain_change_still_changes_the_lds_document() -> None:
    before = docs(node_intent((entry(SERVER, http=(PUBLIC,)),)))
    moved = docs(node_intent((entry(SERVER, http=(PUBLIC,)),), ipcache=(("10.244.3.3/32", SERVER),)))
    assert moved.listeners != before.listeners and moved.listeners["version_info"] != before.listeners["version_info"]


def test_accepted_routes_and_inline_routes() -> None:
    dump = json.dumps({"configs": [
        {"@type": "x", "version_info": "v1", "route_config": {"@type": "y", "name": CHAIN}},
        {"@type": "x", "version_info": "v2", "route_config": {"name": "other"}}, {"version_info": "nameless"}]})
    assert envoy_rds.accepted_routes(dump) == {CHAIN: "v1", "other": "v2"}
    assert envoy_rds.accepted_routes("not json") == {} and envoy_rds.accepted_routes("{}") == {}
    found = docs(node_intent((entry(SERVER, http=(PUBLIC,)),)))
    inline = envoy_rds.inline_routes(found.listeners["resources"], found.routes)
    hcm = hcms({"resources": inline})[CHAIN]
    assert "rds" not in hcm and hcm["route_config"]["name"] == CHAIN and "@type" not in hcm["route_config"]
    assert "rds" in hcms(found.listeners)[CHAIN]  # the input is left alone


def proxy_at(tmp_path: Path) -> envoy_proxy.EnvoyProxy:
    return envoy_proxy.EnvoyProxy("n", netns="", run_dir=tmp_path / "run", admin_socket=tmp_path / "admin.sock",
                                  port=15001, binary="/nonexistent/envoy", publish=lambda _: None)


def test_the_agent_rewrites_only_the_changed_route_file_and_removes_unnamed_ones(tmp_path: Path) -> None:
    proxy = proxy_at(tmp_path)
    proxy.set_intent(with_token("token-one"))
    stale = proxy.rds_dir / "gone-000000000000.json"
    stale.write_text("{}")
    half = proxy.rds_dir / "gone-000000000000.tmp"  # a write an earlier run left half done (may hold a value)
    half.write_text("{}")
    files = {p.name: p.stat().st_ino for p in proxy.rds_dir.iterdir() if p not in (stale, half)}
    lds = (proxy.lds_path.stat().st_ino, proxy.lds_path.read_bytes())
    proxy.set_intent(with_token("token-two"))
    assert (proxy.lds_path.stat().st_ino, proxy.lds_path.read_bytes()) == lds  # not even renamed over
    now = {p.name: p.stat().st_ino for p in proxy.rds_dir.iterdir()}
    assert set(now) == set(files)  # the stale file and the half-written one went
    assert [n for n in now if now[n] != files[n]] == [envoy_rds.file_name(CHAIN)]
    assert "token-two" in (proxy.rds_dir / envoy_rds.file_name(CHAIN)).read_text()


class FakeEnvoy:
    """The admin API's answers (stats, the route configurations' config dump) of an Envoy holding ``lds`` and
    ``routes``; ``hold`` keeps the next answer back until set."""

    def __init__(self) -> None:
        self.lds, self.routes = "", {}  # type: ignore[var-annotated]
        self.hold: asyncio.Event | None = None
        self.dumps = 0

    def get(self, url: str) -> Any:
        envoy = self

        class Answer:
            async def __aenter__(self) -> Answer:
                if envoy.hold is not None:
                    await envoy.hold.wait()
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def text(self) -> str:
                if url.endswith(envoy_rds.CONFIG_DUMP_PATH):
                    envoy.dumps += 1
                    return json.dumps({"configs": [{"version_info": v, "route_config": {"name": n}}
                                                   for n, v in envoy.routes.items()]})
                return (f'listener_manager.lds.version_text: "{envoy.lds}"\n'
                        f'cluster_manager.cds.version_text: "{envoy.lds}"\nlistener_manager.lds.update_rejected: 0\n')

        return Answer()


def test_not_enforced_before_envoy_acknowledged_every_route_configuration(tmp_path: Path) -> None:
    class Running:
        returncode = None
        pid = 1

    async def scenario() -> None:
        proxy, envoy = proxy_at(tmp_path), FakeEnvoy()
        session: Any = envoy
        intent = with_token("token-one")
        proxy.set_intent(intent)
        proxy.process = Running()  # type: ignore[assignment]
        envoy.lds, envoy.routes = proxy.wanted_lds_version, {n: v for n, v in proxy.wanted_routes.items() if n != CHAIN}
        await proxy._poll_admin(session)
        assert "has not loaded configuration" in proxy.problem(intent)  # one route configuration missing
        envoy.routes[CHAIN] = "an older version"
        await proxy._poll_admin(session)
        assert "has not loaded configuration" in proxy.problem(intent)
        envoy.routes = dict(proxy.wanted_routes)
        await proxy._poll_admin(session)
        assert proxy.problem(intent) == "" and proxy.status()["accepted_version"] == proxy.wanted_version
        dumps = envoy.dumps
        await proxy._poll_admin(session)
        assert envoy.dumps == dumps  # in step: the config dump is not asked for
        old_routes = dict(envoy.routes)
        rotated = with_token("token-two")
        proxy.set_intent(rotated)  # only its routes change: the LDS version stays, Envoy's old routes do not count
        assert proxy.wanted_lds_version == envoy.lds
        assert "has not loaded configuration" in proxy.problem(rotated)
        await proxy._poll_admin(session)
        assert "has not loaded configuration" in proxy.problem(rotated)
        # an answer asked before new documents were written is not taken: here Envoy answers with the first
        # intent's routes while the agent goes back to that intent (same versions) after a third one
        envoy.hold = asyncio.Event()
        polling = asyncio.create_task(proxy._poll_admin(session))
        await asyncio.sleep(0)
        proxy.set_intent(with_token("token-three"))
        proxy.set_intent(intent)
        envoy.routes = old_routes
        envoy.hold.set()
        await polling
        assert "has not loaded configuration" in proxy.problem(intent)
        envoy.hold = None
        await proxy._poll_admin(session)  # asked after the writes: counts
        assert proxy.problem(intent) == ""
        # a new revision with the same documents writes nothing: still enforced, no need to ask Envoy again
        again = intent.model_copy(update={"revision": intent.revision + 1})
        before = proxy.wanted_version
        proxy.set_intent(again)
        assert proxy.wanted_version != before and proxy.problem(again) == ""

    asyncio.run(scenario())


def test_more_chains_than_route_files_keep_their_routes_inline() -> None:
    """Each route file costs Envoy an inotify instance: past ``MAX_ROUTE_FILES`` chains the node's listeners hold
    their routes inline (no route file), as before route discovery."""
    many = envoy_rds.MAX_ROUTE_FILES + 1
    wide = node_intent(tuple(entry(SERVER, port=8000 + i) for i in range(many)))
    built = docs(wide)
    managers = hcms(built.listeners)
    assert len(managers) >= many and built.routes == {}
    assert all("route_config" in m and "rds" not in m for m in managers.values())
    narrow = docs(node_intent(tuple(entry(SERVER, port=8000 + i) for i in range(3))))
    assert 0 < len(narrow.routes) == len(hcms(narrow.listeners)) <= envoy_rds.MAX_ROUTE_FILES
    assert all("rds" in m for m in hcms(narrow.listeners).values())
