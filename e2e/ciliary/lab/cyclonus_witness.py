"""The datapath's own account of each probe cyclonus got wrong: the kernel witness of a live run.

cyclonus counts a probe "allowed" when ``pods/exec`` of ``agnhost connect`` returns no error, and
client-go reads an exec whose error stream closes empty (its connection was cut before the kubelet
wrote the exit status) as success (kubernetes/kubectl#1726, kubernetes/kubernetes#137404). So a
wrong allow in cyclonus's table is either a packet the datapath let through or a probe whose exit
status was lost. The flows settle it: while cyclonus runs, :class:`FlowRecorder` follows every
node's flow API (the agent's ``/v1/flows?follow=1``) and keeps the flows of cyclonus's namespaces;
afterwards :func:`witness` finds, for each wrong cell of a try, the flows of that cell's tuple
(source and destination address, protocol, destination port) within the try and says what the
datapath did with them: a packet forwarded at the destination's ingress is the datapath's allow (a bug
unless it is a documented difference); dropped packets and none admitted mean the datapath refused the
probe, whatever cyclonus read. Checked on a live run (3 cases, 864 probes): every probe cyclonus saw
blocked had a drop and none admitted, every one it saw allowed had its ingress forward.

Owns the parsing of cyclonus's output (:func:`wrong_cells`: pod addresses, expected and observed
tables, the time window of each try), the pods' addresses as the flows name them (:func:`addressed`:
cyclonus prints addresses once, before the pods a case adds exist), the matching (:func:`witness`,
pure) and the recorder (a child process per node; ``python -m ciliary.lab.cyclonus_witness follow URL NAMESPACES`` is what
runs inside the node's network namespace).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import urllib.request
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import TextIO

#: the chart's agent serves its health and flow API here, inside the node's network namespace
AGENT_FLOWS_URL = "http://127.0.0.1:9876/v1/flows"
#: seconds around a try in which a flow still counts as that try's (a probe ends up to its timeout later)
SLACK_S = 5.0

_TIMED = re.compile(r'^time="([^"]+)" level=\w+ msg="(.*)"$')
_CELL = re.compile(r"^\|\s*([a-z0-9-]+/[a-z0-9-]+)\s*\|(.*)\|\s*$")
_POD_ROW = re.compile(r"^\|\s*([a-z0-9-]*)\s*\|[^|]*\|\s*([a-z0-9-]+)\s*\|[^|]*\|\s*pod:\s*([0-9.]+)\s*\|")


@dataclass(frozen=True)
class Cell:
    """One probe of one try whose outcome differs from cyclonus's truth table."""

    case: int
    run: int
    """The try's position in its case (steps and their tries, in order, from 0)."""
    source: str
    destination: str
    protocol: str
    port: int
    expected: str
    """``X`` blocked or ``.`` allowed, as cyclonus's truth table says."""
    source_ip: str
    destination_ip: str
    start: float
    """Unix seconds: when the try began; ``end`` when the next thing cyclonus logged happened."""
    end: float

    def name(self) -> str:
        got = "allowed" if self.expected == "X" else "blocked"
        return f"#{self.case} try {self.run}: {self.source} -> {self.destination} {self.protocol}/{self.port} {got}"


def _seconds(stamp: str) -> float:
    """Unix seconds of an RFC 3339 UTC time (cyclonus's ``...Z`` or a flow's nanoseconds)."""
    base, _, fraction = stamp.rstrip("Z").partition(".")
    whole = dt.datetime.fromisoformat(base).replace(tzinfo=dt.UTC).timestamp()
    return whole + (float(f"0.{fraction}") if fraction else 0.0)


def _table(lines: Sequence[str], first: int) -> tuple[list[tuple[str, int]], list[str], dict[str, list[str]]]:
    """The probe table starting at ``lines[first]``: (ports in cell order, column pods, row -> cells)."""
    ports: list[tuple[str, int]] = []
    columns: list[str] = []
    rows: dict[str, list[str]] = {}
    i = first
    while i < len(lines) and lines[i].startswith(("+", "|")):
        parts = [p.strip() for p in lines[i].strip().strip("|").split("|")]
        if lines[i].startswith("|") and "/" in parts[0] and parts[0].split("/")[0].isupper():
            protocol, port = parts[0].split("/")
            ports.append((protocol, int(port)))
            if not columns:
                columns = [p.lower() for p in parts[1:]]
        elif cell := _CELL.match(lines[i]):
            rows[cell.group(1)] = [c.strip() for c in cell.group(2).split("|")]
        i += 1
    return ports, columns, rows


def wrong_cells(output: str, *, ignore_loopback: bool = True) -> list[Cell]:
    """Every probe of every try whose outcome differs from the truth table cyclonus printed before it."""
    lines = output.splitlines()
    stamps = [(i, _seconds(m.group(1)), m.group(2)) for i, line in enumerate(lines) if (m := _TIMED.match(line))]
    ends = {i: next((t for j, t, _ in stamps if j > i), t0) for i, t0, _ in stamps}
    ips: dict[str, str] = {}
    namespace = ""
    case, tables = 0, 0
    runs: list[tuple[float, float]] = []
    expected: dict[str, list[str]] = {}
    found: list[Cell] = []
    by_line = {i: (t, msg) for i, t, msg in stamps}
    for i, line in enumerate(lines):
        if i in by_line:
            when, msg = by_line[i]
            if msg.startswith("running kube probe on try"):
                runs.append((when, ends[i]))
            continue
        if started := re.match(r"^starting test case #(\d+)$", line):
            case, runs, tables = int(started.group(1)), [], 0
        elif pod := _POD_ROW.match(line):
            namespace = pod.group(1) or namespace
            ips[f"{namespace}/{pod.group(2)}"] = pod.group(3)
        elif line.startswith("Expected combined:"):
            _, _, expected = _table(lines, i + 1)
        elif line.startswith("kube results, try"):
            ports, columns, observed = _table(lines, i + 1)
            if tables >= len(runs):
                continue  # a table without its try's time: nothing to match flows against
            start, end = runs[tables]
            for source, cells in observed.items():
                for destination, got, want in zip(columns, cells, expected.get(source, []), strict=False):
                    if ignore_loopback and source == destination:
                        continue
                    for (protocol, port), g, w in zip(ports, got.split(), want.split(), strict=False):
                        if g != w:
                            found.append(Cell(case, tables, source, destination, protocol, port, w,
                                              ips.get(source, ""), ips.get(destination, ""), start, end))
            tables += 1
    return found


def matching(cell: Cell, flows: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """The flows of the cell's tuple in its try (source and destination address, protocol, port)."""
    out = []
    for flow in flows:
        if _tuple(flow) != (cell.source_ip, cell.destination_ip, cell.protocol, cell.port):
            continue
        when = _seconds(str(flow.get("time", "1970-01-01T00:00:00Z")))
        if cell.start - SLACK_S <= when <= cell.end + SLACK_S:
            out.append(flow)
    return out


#: (source address, destination address, protocol, destination port)
FlowKey = tuple[object, object, object, object]


def _tuple(flow: dict[str, object]) -> FlowKey:
    src, dst = flow.get("src") or {}, flow.get("dst") or {}
    if not (isinstance(src, dict) and isinstance(dst, dict)):
        return (None, None, None, None)
    return (src.get("ip"), dst.get("ip"), flow.get("protocol"), dst.get("port"))


def by_tuple(flows: Iterable[dict[str, object]]) -> dict[FlowKey, list[dict[str, object]]]:
    """The flows grouped by (source address, destination address, protocol, destination port): a run's
    tens of thousands of flows are matched against as many probes, so each cell looks at its own tuple's."""
    out: dict[FlowKey, list[dict[str, object]]] = {}
    for flow in flows:
        out.setdefault(_tuple(flow), []).append(flow)
    return out


def _cell_flows(cell: Cell, index: dict[FlowKey, list[dict[str, object]]]) -> list[dict[str, object]]:
    return matching(cell, index.get((cell.source_ip, cell.destination_ip, cell.protocol, cell.port), []))


def _opening(flow: dict[str, object]) -> bool:
    """A flow of a new connection's first packet: not TCP, or TCP with SYN and without ACK."""
    if flow.get("protocol") != "TCP":
        return True
    flags = flow.get("tcp_flags") or []
    return isinstance(flags, list) and "SYN" in flags and "ACK" not in flags


def verdict(cell: Cell, flows: Sequence[dict[str, object]]) -> str:
    """One line: what the datapath did with the cell's packets. A probe crosses two hooks, the source's
    egress and the destination's ingress; a drop at either blocks it, and only the destination's ingress
    forwarding it (a new connection's first packet) lets it through. A packet taken for a reply of a
    tracked connection, or one to an address without an endpoint, passes without a flow. Only an opening
    flow counts as admitted: the agents' default monitor aggregation also reports a TCP connection's later
    FIN/RST, which may be an earlier step's connection closing in this one's time window."""
    admitted = [f for f in flows if f.get("verdict") == "FORWARDED" and f.get("direction") == "ingress"
                and not f.get("is_reply") and _opening(f)]
    dropped = [f for f in flows if f.get("verdict") == "DROPPED"]

    def summary(group: Sequence[dict[str, object]]) -> str:
        seen = sorted({f"{f.get('node')} {f.get('direction')} {f.get('reason')}" for f in group})
        return "; ".join(seen)

    if admitted:
        also = f", dropped {len(dropped)} ({summary(dropped)})" if dropped else ""
        return (f"{cell.name()}: the datapath FORWARDED {len(admitted)} packet(s) at the destination's ingress "
                f"({summary(admitted)}){also}")
    if dropped:
        return (f"{cell.name()}: the datapath dropped {len(dropped)} packet(s) ({summary(dropped)}) and admitted "
                "none: the probe's outcome is not the datapath's")
    if flows:
        return (f"{cell.name()}: only the source's egress recorded it ({summary(flows)}); nothing at the "
                "destination's ingress (a reply of a tracked connection, or an address without an endpoint)")
    return f"{cell.name()}: no flow of it recorded (a reply of a tracked connection, or an address without an endpoint)"


def pod_addresses(flows: Iterable[dict[str, object]]) -> dict[str, list[tuple[float, str]]]:
    """``namespace/pod`` -> (time, address) of every flow end that names its pod, in time order. An agent
    names the pods of its own node, so each pod is named by the flows its node records, including pods a
    case adds after cyclonus printed its table of addresses (a namespace it creates, a pod it adds)."""
    seen: dict[str, list[tuple[float, str]]] = {}
    for flow in flows:
        when = _seconds(str(flow.get("time", "1970-01-01T00:00:00Z")))
        for end in (flow.get("src"), flow.get("dst")):
            if isinstance(end, dict) and end.get("namespace") and end.get("pod") and end.get("ip"):
                seen.setdefault(f"{end['namespace']}/{end['pod']}", []).append((when, str(end["ip"])))
    for named in seen.values():
        named.sort()
    return seen


def address(pod: str, start: float, end: float, seen: dict[str, list[tuple[float, str]]], printed: str) -> str:
    """The pod's address during a try: the one its node's flows name within the try's window, else the one
    cyclonus printed, else the one named closest in time (a pod that was recreated has a new address)."""
    named = seen.get(pod, [])  # in time order (pod_addresses): the window is a slice
    first = bisect_left(named, start - SLACK_S, key=itemgetter(0))
    inside = named[first:bisect_right(named, end + SLACK_S, lo=first, key=itemgetter(0))]
    if inside:  # the address named most often in the window; of equals, the one named last
        counts = Counter(ip for _, ip in inside)
        return max(reversed([ip for _, ip in inside]), key=counts.__getitem__)
    if printed or not named:
        return printed
    return min(named, key=lambda item: min(abs(item[0] - start), abs(item[0] - end)))[1]


def addressed(cells: Iterable[Cell], flows: Sequence[dict[str, object]]) -> list[Cell]:
    """The cells with each end's address as the flows of its try name it (see :func:`address`)."""
    seen = pod_addresses(flows)
    return [replace(cell, source_ip=address(cell.source, cell.start, cell.end, seen, cell.source_ip),
                    destination_ip=address(cell.destination, cell.start, cell.end, seen, cell.destination_ip))
            for cell in cells]


def witness(output: str, flows: Sequence[dict[str, object]], *, ignore_loopback: bool = True) -> list[str]:
    cells, index = addressed(wrong_cells(output, ignore_loopback=ignore_loopback), flows), by_tuple(flows)
    return [verdict(cell, _cell_flows(cell, index)) for cell in cells]


def turned(output: str) -> str:
    """cyclonus's output with every correct step's table (printed after ``0 wrong, ...``: what its probes saw)
    also given as a try that saw every probe the other way: each of its probes becomes a wrong cell."""
    lines = output.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        if re.match(r"^0 wrong, \d+ ignored, \d+ correct$", lines[i]):
            j = i + 1
            while j < len(lines) and lines[j].startswith(("+", "|")):
                j += 1
            seen = lines[i + 1:j]
            other = [t.replace(" .", " #").replace(" X", " .").replace(" #", " X") if _CELL.match(t) else t
                     for t in seen]
            out += [*seen, "Expected combined:", *seen, "kube results, try 0:", *other]
            i = j
            continue
        i += 1
    return "\n".join(out)


def self_check(output: str, flows: Sequence[dict[str, object]], *, ignore_loopback: bool = True) -> tuple[int, list[str]]:
    """Does the witness agree with every probe of the correct steps? (probes checked, the lines that disagree:
    a blocked probe must show a drop and nothing admitted, an allowed one its ingress forward)."""
    checked, disagree = 0, []
    index = by_tuple(flows)
    for cell in addressed(wrong_cells(turned(output), ignore_loopback=ignore_loopback), flows):
        line = verdict(cell, _cell_flows(cell, index))
        checked += 1
        admitted = "FORWARDED" in line and "at the destination's ingress" in line
        refused = "admitted none" in line
        if not (refused if cell.expected == "X" else admitted):
            disagree.append(line)
    return checked, disagree


def read_flows(paths: Iterable[Path]) -> list[dict[str, object]]:
    flows = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                flows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the line the recorder was stopped in
    return flows


def keep(flow: dict[str, object], namespaces: frozenset[str]) -> bool:
    """Is the flow to or from a pod of ``namespaces``?"""
    ends = (flow.get("src"), flow.get("dst"))
    return any(isinstance(end, dict) and end.get("namespace") in namespaces for end in ends)


def follow(url: str, namespaces: frozenset[str], out: TextIO | None = None) -> None:
    """Copy the followed flows of ``namespaces`` to ``out`` (one JSON line each) until the stream ends."""
    with urllib.request.urlopen(f"{url}?follow=1&last=0", timeout=None) as stream:
        for raw in stream:
            try:
                flow = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if keep(flow, namespaces):
                print(json.dumps(flow, separators=(",", ":")), file=out or sys.stdout, flush=True)


class FlowRecorder:
    """One ``follow`` child per node (``prefix`` puts it in the node's network namespace), each writing
    ``<out>/flows-<node>.jsonl``; :meth:`stop` ends them."""

    def __init__(self, out: Path, nodes: Sequence[str], prefix: dict[str, list[str]], namespaces: Iterable[str],
                 url: str = AGENT_FLOWS_URL) -> None:
        self.paths = {node: out / f"flows-{node}.jsonl" for node in nodes}
        self._procs: list[subprocess.Popen[bytes]] = []
        wanted = ",".join(sorted(namespaces))
        for node, path in self.paths.items():
            with path.open("wb") as sink:
                self._procs.append(subprocess.Popen(
                    [*prefix.get(node, []), sys.executable, "-m", "ciliary.lab.cyclonus_witness", "follow", url,
                     wanted], stdout=sink, stderr=subprocess.DEVNULL))

    def wait(self, timeout: float) -> None:
        """Wait for the children to end by themselves (their streams ended)."""
        for proc in self._procs:
            proc.wait(timeout=timeout)

    def stop(self) -> list[Path]:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return list(self.paths.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "follow":
        follow(args[1], frozenset(args[2].split(",")))
        return 0
    if len(args) == 2 and args[0] == "check":
        run = Path(args[1])
        checked, disagree = self_check((run / "cyclonus.log").read_text(errors="replace"),
                                       read_flows(sorted(run.glob("flows-*.jsonl"))))
        print(f"witness self-check: {checked} probes of the correct steps, {len(disagree)} the flows disagree with")
        for line in disagree:
            print(f"  {line}")
        return 1 if disagree or not checked else 0
    print("usage: python -m ciliary.lab.cyclonus_witness follow URL NAMESPACE[,NAMESPACE...]\n"
          "       python -m ciliary.lab.cyclonus_witness check RUN_DIR   (cyclonus.log and flows-*.jsonl)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
