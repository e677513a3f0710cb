"""The kernel witness of cyclonus's live run: the wrong cells read from cyclonus's output (with each try's
time window and the pods' addresses), the flows of each cell's tuple, and the recorder that follows a node's
flow API. The output excerpt is case #14 of the session-19 run (README "Upstream conformance"), trimmed to
the rows that matter; the flow is shaped like the agent's (``ciliary.nodeagent.flowapi``)."""

from __future__ import annotations

import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary.lab import cyclonus_witness as w

RESOURCES = """\
+-----------+--------------------------------+-----+------------+------------------------+-------------------+
| NAMESPACE |           NS LABELS            | POD | POD LABELS |          IPS           | CONTAINERS/PORTS  |
+-----------+--------------------------------+-----+------------+------------------------+-------------------+
| x         | kubernetes.io/metadata.name: x | a   | pod: a     | pod: 10.244.1.16       | cont-80-tcp, port |
|           | ns: x                          |     |            | service: 10.96.250.80  | serve-80-tcp      |
+           +                                +-----+------------+------------------------+-------------------+
|           |                                | c   | pod: c     | pod: 10.244.2.18       | cont-80-tcp, port |
+-----------+--------------------------------+-----+------------+------------------------+-------------------+
| z         | kubernetes.io/metadata.name: z | c   | pod: c     | pod: 10.244.2.20       | cont-80-tcp, port |
+-----------+--------------------------------+-----+------------+------------------------+-------------------+
"""

HEADER = """\
+--------+---------+---------+---------+
| TCP/80 |   X/A   |   X/C   |   Z/C   |
| TCP/81 |         |         |         |
| UDP/80 |         |         |         |
| UDP/81 |         |         |         |
+--------+---------+---------+---------+
"""


def table(xa: str, xc: str, zc: str) -> str:
    """cyclonus's combined table: rows x/a, x/c, z/c; the given cells are each row's column X/A."""
    rows = (("x/a", xa), ("x/c", xc), ("z/c", zc))
    return HEADER + "".join(f"| {row}    | {cells} | . . . . | . . . . |\n+--------+\n" for row, cells in rows)


CASE_14 = f"""resources:
{RESOURCES}
starting test case #14
time="2026-12-05T21:50:08Z" level=info msg="cluster state reset"
time="2026-12-05T21:50:16Z" level=info msg="running kube probe on try 1"
time="2026-12-05T21:51:43Z" level=info msg="running kube probe on try 2"
evaluating test case: pods by label + ns by label
step 1 on all available ports/protocols:
Discrepancy found:1 wrong, 9 ignored, 71 correct
Expected combined:
{table("X X X X", ". X X X", "X X X X")}
kube results, try 0:
{table(". . . .", ". X X X", "X X . X")}
kube results, try 1:
{table(". . . .", ". X X X", "X X X .")}
finished policy #14
starting test case #15
time="2026-12-05T21:52:38Z" level=info msg="cluster state reset"
"""

T_TRY0, T_TRY1, T_END = 1796507416.0, 1796507503.0, 1796507558.0  # 21:50:16, 21:51:43, 21:52:38 UTC


def flow(verdict: str, reason: str, time: str, *, port: int = 80, src: str = "10.244.2.20",
         dst: str = "10.244.1.16", namespace: str = "x", src_namespace: str = "z", direction: str = "ingress",
         node: str = "node-1", pod: str = "a") -> dict[str, object]:
    return {"time": time, "node": node, "verdict": verdict, "reason": reason, "direction": direction,
            "protocol": "UDP", "src": {"ip": src, "port": 40001, "namespace": src_namespace, "pod": ""},
            "dst": {"ip": dst, "port": port, "namespace": namespace, "pod": pod}}


def test_the_wrong_cells_of_each_try_with_its_window_and_addresses() -> None:
    cells = w.wrong_cells(CASE_14)
    assert [(c.case, c.run, c.source, c.destination, c.protocol, c.port, c.expected) for c in cells] == [
        (14, 0, "z/c", "x/a", "UDP", 80, "X"), (14, 1, "z/c", "x/a", "UDP", 81, "X")]
    assert [(c.start, c.end) for c in cells] == [(T_TRY0, T_TRY1), (T_TRY1, T_END)]
    assert (cells[0].source_ip, cells[0].destination_ip) == ("10.244.2.20", "10.244.1.16")
    assert cells[0].name() == "#14 try 0: z/c -> x/a UDP/80 allowed"


def test_a_pods_probe_of_itself_counts_only_without_ignore_loopback() -> None:
    assert not [c for c in w.wrong_cells(CASE_14) if c.source == c.destination]
    assert {(c.source, c.destination) for c in w.wrong_cells(CASE_14, ignore_loopback=False)} == {
        ("x/a", "x/a"), ("z/c", "x/a")}


#: z/c's datagram leaves z/c's unenforced egress (node-2) and is dropped at x/a's ingress (node-1)
LEFT_Z_C = flow("FORWARDED", "OK_UNENFORCED", "2026-12-05T21:51:38.1Z", direction="egress", node="node-2")


def test_a_probe_dropped_at_the_destination_is_not_the_datapaths_allow() -> None:
    flows = [LEFT_Z_C, flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:38.102030405Z"),
             flow("DROPPED", "DROP_POLICY", "2026-12-05T21:52:36.5Z", port=81)]
    assert w.witness(CASE_14, flows) == [
        "#14 try 0: z/c -> x/a UDP/80 allowed: the datapath dropped 1 packet(s) (node-1 ingress DROP_POLICY) "
        "and admitted none: the probe's outcome is not the datapath's",
        "#14 try 1: z/c -> x/a UDP/81 allowed: the datapath dropped 1 packet(s) (node-1 ingress DROP_POLICY) "
        "and admitted none: the probe's outcome is not the datapath's"]


def test_only_the_destinations_ingress_admits_and_other_tuples_or_times_are_not_matched() -> None:
    cell = w.wrong_cells(CASE_14)[0]
    flows = [flow("FORWARDED", "OK_UNENFORCED", "2026-12-05T21:51:40Z"),
             flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z", port=81),          # another port
             flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z", src="10.244.2.18"),  # another source
             flow("DROPPED", "DROP_POLICY", "2026-12-05T21:40:00Z")]                    # before the try
    assert w.matching(cell, flows) == flows[:1]
    assert w.verdict(cell, w.matching(cell, [LEFT_Z_C, *flows])).endswith(
        "the datapath FORWARDED 1 packet(s) at the destination's ingress (node-1 ingress OK_UNENFORCED)")
    assert w.verdict(cell, [LEFT_Z_C]).endswith(
        "only the source's egress recorded it (node-2 egress OK_UNENFORCED); nothing at the destination's "
        "ingress (a reply of a tracked connection, or an address without an endpoint)")
    assert w.verdict(cell, []).endswith(
        "no flow of it recorded (a reply of a tracked connection, or an address without an endpoint)")


#: case #35's shape: a step adds pod x/d, which cyclonus's table of addresses (printed once, first) lacks
CASE_ADDS_A_POD = CASE_14.replace("| Z/C ", "| X/D ").replace("z/c", "x/d")


def test_a_pod_the_case_adds_gets_its_address_from_the_flows_that_name_it() -> None:
    cells = w.wrong_cells(CASE_ADDS_A_POD)
    assert [(c.source, c.source_ip) for c in cells] == [("x/d", ""), ("x/d", "")]
    # x/d's node names it (its egress), x/a's node drops the probe at x/a's ingress
    named = {"time": "2026-12-05T21:51:38Z", "node": "node-2", "verdict": "FORWARDED", "reason": "OK_UNENFORCED",
             "direction": "egress", "protocol": "UDP", "src": {"ip": "10.244.2.30", "port": 40001,
                                                               "namespace": "x", "pod": "d"},
             "dst": {"ip": "10.244.1.16", "port": 80, "namespace": "x", "pod": ""}}
    flows = [named, flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:38.1Z", src="10.244.2.30", src_namespace="x")]
    assert [(c.source_ip, c.destination_ip) for c in w.addressed(cells, flows)] == [
        ("10.244.2.30", "10.244.1.16"), ("10.244.2.30", "10.244.1.16")]
    assert w.witness(CASE_ADDS_A_POD, flows)[0] == (
        "#14 try 0: x/d -> x/a UDP/80 allowed: the datapath dropped 1 packet(s) (node-1 ingress DROP_POLICY) "
        "and admitted none: the probe's outcome is not the datapath's")
    # without a flow that names x/d the witness cannot find its probes: it says so, as before
    assert w.witness(CASE_ADDS_A_POD, flows[1:])[0].endswith("no flow of it recorded (a reply of a tracked "
                                                              "connection, or an address without an endpoint)")


def test_an_address_named_in_the_try_wins_over_the_printed_one_and_the_nearest_is_the_last_resort() -> None:
    seen = {"x/a": [(100.0, "10.0.0.1"), (200.0, "10.0.0.2"), (205.0, "10.0.0.2")]}
    assert w.address("x/a", 198.0, 210.0, seen, "10.0.0.9") == "10.0.0.2"   # recreated: the try's own address
    assert w.address("x/a", 95.0, 202.0, seen, "") == "10.0.0.2"            # named most often in the window
    assert w.address("x/a", 95.0, 195.0, seen, "") == "10.0.0.2"            # as often: the one named last
    assert w.address("x/a", 400.0, 410.0, seen, "10.0.0.9") == "10.0.0.9"   # not named in the try: cyclonus's
    assert w.address("x/a", 400.0, 410.0, seen, "") == "10.0.0.2"           # neither: the nearest named
    assert w.address("y/b", 100.0, 110.0, seen, "") == ""


def test_only_flows_of_the_given_namespaces_are_kept() -> None:
    assert w.keep(flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z"), frozenset({"x"}))
    assert w.keep(flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z", namespace="netpol-x-1"), frozenset({"z"}))
    assert not w.keep(flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z", namespace="netpol-x-1",
                           src_namespace="netpol-y-1"), frozenset({"x", "y", "z"}))


@pytest.fixture
def flow_api() -> Iterator[str]:
    """A flow API serving one flow of namespace x and one of another namespace, then ending the stream."""
    body = (json.dumps(flow("DROPPED", "DROP_POLICY", "2026-12-05T21:51:40Z")) + "\n"
            + json.dumps(flow("FORWARDED", "OK_POLICY", "2026-12-05T21:51:41Z", namespace="netpol-x-1",
                              src_namespace="netpol-y-1")) + "\n")
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/flows"
        assert asked and all(p == "/v1/flows?follow=1&last=0" for p in asked)
    finally:
        server.shutdown()
        server.server_close()


def test_follow_copies_the_kept_flows(flow_api: str) -> None:
    out = io.StringIO()
    w.follow(flow_api, frozenset({"x", "y", "z"}), out)
    assert [json.loads(line)["dst"]["namespace"] for line in out.getvalue().splitlines()] == ["x"]


def test_the_recorder_writes_one_file_per_node(flow_api: str, tmp_path: Path) -> None:
    recorder = w.FlowRecorder(tmp_path, ["node-1"], {}, ["x", "y", "z"], url=flow_api)
    recorder.wait(timeout=60)  # this stream ends by itself; a live one runs until stop()
    paths = recorder.stop()
    assert paths == [tmp_path / "flows-node-1.jsonl"]
    assert [f["verdict"] for f in w.read_flows(paths)] == ["DROPPED"]


CORRECT_STEP = f"""resources:
{RESOURCES}
starting test case #1
time="2026-12-05T21:50:16Z" level=info msg="running kube probe on try 1"
evaluating test case: pods by label + ns by label
step 1 on all available ports/protocols:
0 wrong, 3 ignored, 8 correct
{HEADER}| z/c    | X X X X | . . . . | . . . . |
+--------+---------+---------+---------+

finished policy #1
starting test case #2
time="2026-12-05T21:51:00Z" level=info msg="cluster state reset"
"""


def test_the_self_check_turns_every_probe_of_a_correct_step_and_needs_the_flows_to_agree() -> None:
    ports = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81))
    flows = [{**flow("DROPPED", "DROP_POLICY", "2026-12-05T21:50:20Z", port=port), "protocol": protocol}
             for protocol, port in ports]
    flows += [{**flow("FORWARDED", "OK_UNENFORCED", "2026-12-05T21:50:21Z", port=port, dst="10.244.2.18",
                      node="node-2", pod="c"), "protocol": protocol, "tcp_flags": ["SYN"] if protocol == "TCP" else []}
              for protocol, port in ports]
    assert w.self_check(CORRECT_STEP, flows) == (8, [])
    checked, disagree = w.self_check(CORRECT_STEP, flows[:-1])  # z/c -> x/c UDP/81: its forward not recorded
    assert checked == 8
    assert disagree == ["#1 try 0: z/c -> x/c UDP/81 blocked: no flow of it recorded (a reply of a tracked "
                        "connection, or an address without an endpoint)"]
    assert w.wrong_cells(CORRECT_STEP) == []  # the run itself had no wrong cell


def test_a_tcp_connections_later_flags_are_not_an_admission() -> None:
    """With the agents' medium monitor aggregation a TCP connection also reports its FIN: an earlier step's
    connection closing in this cell's window is not the datapath admitting this probe; its SYN is."""
    tcp = {**flow("FORWARDED", "OK_POLICY", "2026-12-05T21:51:40Z"), "protocol": "TCP"}
    assert not w._opening({**tcp, "tcp_flags": ["FIN", "ACK"]})
    assert not w._opening({**tcp, "tcp_flags": ["SYN", "ACK"]})
    assert w._opening({**tcp, "tcp_flags": ["SYN"]}) and w._opening(flow("FORWARDED", "OK_POLICY", "x"))
