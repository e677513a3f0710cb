"""The service map (``ciliary-ui``, ``CILIARY_UI_URL`` of ``ciliary lab env``) in a real browser: Debian's
chromium driven by playwright (no browser download), against the lab's relay and real traffic.

The Star Wars scene of the demo: deathstar and xwing on node-1, tiefighter on node-2, Cilium's rule1
(only org=empire into the deathstar on 80/TCP). The page must show the three workloads in namespace
default, a forwarded edge tiefighter -> deathstar and a dropped one xwing -> deathstar, both TCP/80,
update by itself when new flows arrive, and load nothing from anywhere but its own server.

Runs on the real-node lab: the service map is the chart's (the ``hubble-ui`` Service, ``ciliary-ui``
reading the chart's relay), which the lab forwards to a loopback port of this shell (``CILIARY_UI_URL``).
The dashboard's Prometheus scrapes the chart agents' node-local ``/metrics`` listeners (host network)
through a loopback forward per node (``LabHandle.scrape_targets``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import demo
from lab_harness import LabHandle

pytestmark = pytest.mark.e2e
#: real nodes: Chromium opens the chart's service map (the hubble-ui Service the lab forwards to
#: CILIARY_UI_URL, reading the chart's relay); the dashboard's Prometheus scrapes the chart's agents'
#: node-local metrics listeners (LabHandle.ui_url, scrape_targets)
REAL_NODES = True

ROOT = Path(__file__).resolve().parents[1]
STAR_WARS = ("deathstar", "tiefighter", "xwing")
SCREENSHOT_FOR_THE_LEAD = Path("/tmp/ciliary-service-map.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DROPPED_EDGE = 'g.edge[data-source-name="xwing"][data-target-name="deathstar"][data-port="80"]'
FORWARDED_EDGE = 'g.edge[data-source-name="tiefighter"][data-target-name="deathstar"][data-port="80"]'


def delete_scene(lab: LabHandle) -> None:
    lab.kubectl("delete", "pod", *STAR_WARS, "-n", "default", "--ignore-not-found", "--wait=true",
                "--timeout=60s", check=False)


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Any:
    """The scene with rule1 enforced and both kinds of traffic sent once; yields the deathstar's IP."""
    delete_scene(lab)  # another test of the session may have placed the same pods elsewhere
    lab.apply(demo.real_manifest())
    deathstar = lab.wait_running("deathstar")["status"]["podIP"]
    lab.wait_running("tiefighter")
    lab.wait_running("xwing")
    lab.kubectl("apply", "-f", str(ROOT / "crds" / "examples" / "starwars-rule1.yaml"))
    lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "cnp/rule1")
    deadline = time.monotonic() + 60
    while lab.probe("http", deathstar, 80, pod="xwing", timeout=1.5).returncode == 0:  # enforced in the kernel
        assert time.monotonic() < deadline, "rule1 not enforced after 60 s"
        time.sleep(0.5)
    assert lab.probe("http", deathstar, 80, pod="tiefighter", timeout=3).returncode == 0
    try:
        yield deathstar
    finally:
        delete_scene(lab)


def star_wars_traffic(lab: LabHandle, deathstar: str) -> None:
    """Both ships try to land again (a few connections each): fresh flows on both nodes for the map."""
    for _ in range(3):
        assert lab.probe("http", deathstar, 80, pod="tiefighter", timeout=3).returncode == 0
        assert lab.probe("http", deathstar, 80, pod="xwing", timeout=1).returncode != 0


def ui_url(lab: LabHandle) -> str:
    """``CILIARY_UI_URL`` as ``ciliary lab env`` prints it (the shell evaluates the lines)."""
    script = "\n".join([*lab.lab.env_lines(), 'echo "$CILIARY_UI_URL"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=20) as r:
        return json.loads(r.read())


def test_env_exports_the_service_map_and_its_json_api(lab: LabHandle, scene: str) -> None:
    star_wars_traffic(lab, scene)
    base = ui_url(lab)
    assert base == lab.ui_url()
    graph = get_json(f"{base}/api/service-map?namespace=default&window=600")
    names = {n["id"]: n["name"] for n in graph["nodes"] if n["namespace"] == "default"}
    assert set(STAR_WARS) <= set(names.values()), graph["nodes"]
    edges = {(names.get(e["source"]), names.get(e["target"]), e["protocol"], e["port"]): e for e in graph["edges"]}
    assert edges["tiefighter", "deathstar", "TCP", 80]["state"] == "forwarded"
    assert "default/rule1" in edges["tiefighter", "deathstar", "TCP", 80]["policies"]
    xwing = edges["xwing", "deathstar", "TCP", 80]
    assert xwing["state"] == "dropped" and xwing["drop_reasons"].get("POLICY_DENIED", 0) > 0
    assert graph["unavailable_nodes"] == [] and "default" in get_json(f"{base}/api/namespaces")["namespaces"]
    only = get_json(f"{base}/api/service-map?pod=default/xwing&to-port=80&window=600")
    assert {(names.get(e["source"]), names.get(e["target"])) for e in only["edges"]} == {("xwing", "deathstar")}
    with pytest.raises(urllib.error.HTTPError) as bad:
        get_json(f"{base}/api/service-map?verdict=SOMETIMES")
    assert bad.value.code == 400


def test_chromium_renders_the_star_wars_map(lab: LabHandle, scene: str, tool: Any, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = tool("chromium")
    star_wars_traffic(lab, scene)
    base = ui_url(lab)
    requests: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{base}/?namespace=default&window=600")
            for edge in (f"{DROPPED_EDGE}[data-state=dropped]", f"{FORWARDED_EDGE}[data-state=forwarded]"):
                try:
                    page.wait_for_selector(edge, timeout=60_000)
                except Exception:  # noqa: BLE001 (say what the page and the API showed instead)
                    graph = get_json(f"{base}/api/service-map?namespace=default&window=600")
                    pytest.fail(f"{edge} not drawn; status {page.text_content('#status')!r}, notice "
                                f"{page.text_content('#notice')!r}; API nodes {[n['name'] for n in graph['nodes']]} "
                                f"edges {[(e['source'][-40:], e['target'][-40:], e['state']) for e in graph['edges']]} "
                                f"unavailable {graph['unavailable_nodes']}")
            deathstar_id = page.get_attribute('g.node[data-name="deathstar"]', "data-id")
            for name in STAR_WARS:
                node = page.locator(f'g.node[data-name="{name}"][data-namespace="default"]')
                assert node.count() == 1, name
                assert node.locator("text.name").text_content() == name
            assert page.locator("#namespace").input_value() == "default"
            dropped_label = page.locator(f"{DROPPED_EDGE} text").text_content() or ""
            forwarded_label = page.locator(f"{FORWARDED_EDGE} text").text_content() or ""
            assert dropped_label.startswith("TCP/80") and "dropped" in dropped_label, dropped_label
            assert forwarded_label.startswith("TCP/80") and "dropped" not in forwarded_label, forwarded_label

            def stroke(edge: str) -> list[str]:  # found and read in one turn of the page (it redraws)
                return page.evaluate("sel => { const s = getComputedStyle(document.querySelector(sel));"
                                     " return [s.stroke, s.strokeDasharray]; }", f"{edge} path")

            assert stroke(DROPPED_EDGE) == ["rgb(217, 54, 54)", "7px, 4px"]  # red, dashed
            assert stroke(FORWARDED_EDGE) == ["rgb(46, 158, 79)", "none"]  # green, solid
            rows = page.locator("#flows tbody tr[data-verdict=DROPPED]")
            assert rows.count() > 0 and "default/xwing" in (rows.first.text_content() or "")

            # live: a new dropped connection shows up without a reload
            before = int(page.get_attribute(DROPPED_EDGE, "data-dropped") or 0)
            lab.probe("http", scene, 80, pod="xwing", timeout=1)
            page.wait_for_function(
                "([sel, n]) => Number(document.querySelector(sel)?.dataset.dropped || 0) > n",
                arg=[DROPPED_EDGE, before], timeout=60_000)

            page.screenshot(path=str(tmp_path / "service-map.png"), full_page=True)
            shutil.copyfile(tmp_path / "service-map.png", SCREENSHOT_FOR_THE_LEAD)

            # the verdict filter is sent to the relay: only the dropped edge stays
            page.select_option("#verdict", "DROPPED")
            page.wait_for_selector(f"{FORWARDED_EDGE}", state="detached", timeout=60_000)
            assert page.locator(f"{DROPPED_EDGE}[data-state=dropped]").count() == 1
            # a `hubble observe` filter typed in: --pod default/tiefighter, any verdict
            page.select_option("#verdict", "")
            page.fill("#f-pod", "default/tiefighter")
            page.press("#f-pod", "Enter")
            page.wait_for_selector(f"{DROPPED_EDGE}", state="detached", timeout=60_000)
            # only node-2's flows name the tiefighter pod, and node-2 knows the deathstar by its labels
            # only: the same graph node (identity), named by its labels, as the flows say
            page.wait_for_selector(f'g.edge[data-source-name="tiefighter"][data-target="{deathstar_id}"]'
                                   '[data-port="80"][data-state=forwarded]', timeout=60_000)
            assert "pod=default%2Ftiefighter" in page.url
            assert "stale" not in (page.get_attribute("#map", "class") or "")
            assert "error" not in (page.get_attribute("#status", "class") or "")
        finally:
            context.close()
    assert (tmp_path / "service-map.png").stat().st_size > 10_000
    assert requests and all(url.startswith(base + "/") for url in requests), requests  # nothing from elsewhere


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_grafana_dashboard_queries_a_real_prometheus(lab: LabHandle, scene: str, tool: Any, tmp_path: Path) -> None:
    """Every expression of charts/ciliary/dashboards/ runs on a real Prometheus scraping both agents after
    the scene's traffic, reads only series the agents export, and the drop panels see the xwing's drops."""
    lab.probe("http", scene, 80, pod="xwing", timeout=1)
    with lab.scrape_targets(("node-1", "node-2")) as scrape:
        dashboard_checks(list(scrape.agents.values()), tool, tmp_path)


def dashboard_checks(targets: list[str], tool: Any, tmp_path: Path) -> None:
    from grafana_dashboard import DASHBOARDS, expressions, metric_names

    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "ciliary-agents", "static_configs": [{"targets": targets}]}]}))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    proc = subprocess.Popen([str(tool("prometheus")), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ups: dict[str, str] = {}
        for _ in range(90):  # bounded: every agent scraped at least twice (rate() needs two samples)
            try:
                ups = {row["metric"]["instance"]: row["value"][1]
                       for row in get_json(f"{api}/query?query=count_over_time(up[1m])")["data"]["result"]}
            except OSError:
                ups = {}
            if set(ups) == set(targets) and all(float(v) >= 3 for v in ups.values()):
                break
            time.sleep(1)
        assert set(ups) == set(targets), ups
        exported = set(get_json(f"{api}/label/__name__/values?match[]=" + urllib.parse.quote(
            '{job="ciliary-agents"}'))["data"])
        results: dict[str, list[Any]] = {}
        for path in DASHBOARDS:
            for where, expr in expressions(path):
                names = metric_names(expr)
                assert names and names <= exported, f"{where}: {sorted(names - exported)} not scraped from the agents"
                answer = get_json(f"{api}/query?query={urllib.parse.quote(expr)}")
                assert answer["status"] == "success", (where, answer)
                results[where] = answer["data"]["result"]
        drops = [row for where, rows in results.items() if "Drops by reason" in where for row in rows]
        assert any(row["metric"].get("reason") == "POLICY_DENIED" for row in drops), drops
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
