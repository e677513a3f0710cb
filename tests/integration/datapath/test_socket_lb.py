"""The socket load balancer (``datapath.lb_engine``) on a real kernel: cgroup programs, real sockets.

A private cgroup v2 directory gets the four programs; a child process moved into it connects to
a frontend (a ClusterIP nobody routes) and lands on backends listening on loopback. Everything
runs in the test's own network namespace's loopback; the cgroup, pins and sockets are removed at
the end, also on failure.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from ciliary.lab import cgroups
from ciliary.nodeagent import lb_planning, netns_sockets
from ciliary.nodeagent.datapath import lb_engine, libbpf, loading, maps
from ciliary.operator.services.intent import BackendIntent, FrontendIntent, FrontendKind, NodeLBIntent

pytestmark = pytest.mark.integration

VIP = "10.96.77.1"
NODE = f"cyt-lb-{os.getpid()}"


def frontend(port: int, protocol: str, backends: list[tuple[str, int]], **kw: object) -> FrontendIntent:
    return FrontendIntent(service="default/web", kind=FrontendKind.CLUSTER_IP, address=VIP, port=port,
                          protocol=protocol, backends=tuple(BackendIntent(address=a, port=p) for a, p in backends),
                          **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lb() -> Iterator[lb_engine.SocketLB]:
    cgroup = cgroups.ensure(cgroups.cgroup2_root() / f"ciliary-test-lb-{os.getpid()}")
    engine = lb_engine.SocketLB(NODE, cgroup=cgroup)
    try:
        engine.start()
        yield engine
    finally:
        engine.teardown()
        for p in (engine.pin_dir,):
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        cgroups.kill_all(cgroup)
        cgroup.rmdir()


class Servers:
    """TCP and UDP servers on loopback ports, each answering with its own name."""

    def __init__(self, count: int) -> None:
        self.tcp = [socket.socket() for _ in range(count)]
        self.udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        for s in (*self.tcp, *self.udp):
            s.bind(("127.0.0.1", 0))
        for s in self.tcp:
            s.listen(64)
            s.settimeout(5)
        for s in self.udp:
            s.settimeout(5)

    def ports(self, kind: str) -> list[int]:
        return [s.getsockname()[1] for s in (self.tcp if kind == "tcp" else self.udp)]

    def close(self) -> None:
        for s in (*self.tcp, *self.udp):
            s.close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers(2)
    try:
        yield s
    finally:
        s.close()


def in_cgroup(engine: lb_engine.SocketLB, work: list[tuple[str, int]], *, udp: bool = False,
              family: int = socket.AF_INET) -> list[str]:
    """Run connects (or UDP exchanges) to (VIP, port) from a child in the cgroup; one result line each.
    ``family`` AF_INET6: IPv6 sockets, addresses given IPv4-mapped (``::ffff:a.b.c.d``)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: join the cgroup, do the work, report, exit without cleanup handlers
        os.close(read)
        out = []
        try:
            (engine.cgroup / "cgroup.procs").write_text(str(os.getpid()))
            for address, port in work:
                if udp:
                    s = socket.socket(family, socket.SOCK_DGRAM)
                    s.settimeout(3)
                    try:
                        s.sendto(b"ping", (address, port))
                        _, peer = s.recvfrom(100)
                        out.append(f"udp-peer {peer[0]}:{peer[1]}")
                    except OSError as exc:
                        out.append(f"error {exc.errno}")
                    s.close()
                    continue
                s = socket.socket(family)
                s.settimeout(3)
                try:
                    s.connect((address, port))
                    peer = s.getpeername()
                    out.append(f"peer {peer[0]}:{peer[1]}")
                except OSError as exc:
                    out.append(f"error {exc.errno}")
                s.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out.append(f"crash {exc!r}")
        os.write(write, "\n".join(out).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode().splitlines()


def accepted_by(servers: Servers, attempts: int) -> list[int]:
    """Which TCP server accepted each pending connection (index), draining them."""
    hits = []
    for i, s in enumerate(servers.tcp):
        s.setblocking(False)
        while True:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                break
            hits.append(i)
            conn.close()
        s.setblocking(True)
    return hits


def test_connect_picks_both_backends_and_getpeername_shows_the_frontend(lb: lb_engine.SocketLB,
                                                                        servers: Servers) -> None:
    tcp = servers.ports("tcp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", p) for p in tcp]),)))
    lines = in_cgroup(lb, [(VIP, 80)] * 40)
    assert lines == [f"peer {VIP}:80"] * 40, lines  # connected, and the socket names the frontend
    hits = accepted_by(servers, 40)
    assert len(hits) == 40 and set(hits) == {0, 1}, hits  # both backends used


def test_same_port_on_tcp_and_udp_are_two_frontends_and_udp_replies_show_the_frontend(
        lb: lb_engine.SocketLB, servers: Servers) -> None:
    tcp, udp = servers.ports("tcp"), servers.ports("udp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(53, "TCP", [("127.0.0.1", tcp[0])]),
                                                frontend(53, "UDP", [("127.0.0.1", udp[1])]))))
    import threading

    def echo() -> None:
        data, peer = servers.udp[1].recvfrom(100)
        servers.udp[1].sendto(data, peer)

    t = threading.Thread(target=echo)
    t.start()
    assert in_cgroup(lb, [(VIP, 53)], udp=True) == [f"udp-peer {VIP}:53"]
    t.join(5)
    assert in_cgroup(lb, [(VIP, 53)]) == [f"peer {VIP}:53"]
    assert accepted_by(servers, 1) == [0]


def test_no_backends_is_refused_at_once_and_local_without_backend_is_not_permitted(lb: lb_engine.SocketLB) -> None:
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", []),
                                                frontend(81, "TCP", [], no_local_backends=True,
                                                         traffic_policy="Local"))))
    # failed by connect() itself, not a timeout (the client's timeout is 3 s)
    assert in_cgroup(lb, [(VIP, 80), (VIP, 81)]) == [f"error {errno.ECONNREFUSED}", f"error {errno.EPERM}"]


def test_updates_take_effect_for_the_next_connect(lb: lb_engine.SocketLB, servers: Servers) -> None:
    tcp = servers.ports("tcp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", tcp[0])]),)))
    in_cgroup(lb, [(VIP, 80)] * 5)
    assert accepted_by(servers, 5) == [0] * 5
    result = lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", tcp[1])]),)))
    assert result.map_writes > 0
    in_cgroup(lb, [(VIP, 80)] * 5)
    assert accepted_by(servers, 5) == [1] * 5
    state = lb.observe()
    assert len(state.backends) == 1  # the unused backend was removed


def test_session_affinity_keeps_one_backend(lb: lb_engine.SocketLB, servers: Servers) -> None:
    tcp = servers.ports("tcp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(
        frontend(80, "TCP", [("127.0.0.1", p) for p in tcp], affinity_timeout=30),)))
    in_cgroup(lb, [(VIP, 80)] * 30)
    hits = accepted_by(servers, 30)
    assert len(hits) == 30 and len(set(hits)) == 1, hits


def test_a_destination_that_is_no_frontend_passes_untouched(lb: lb_engine.SocketLB, servers: Servers) -> None:
    lb.apply(NodeLBIntent(node=NODE, frontends=()))
    port = servers.ports("tcp")[0]
    assert in_cgroup(lb, [("127.0.0.1", port)]) == [f"peer 127.0.0.1:{port}"]
    accepted_by(servers, 1)
    assert lb.observe() == lb_planning.LBState({}, {})


def test_programs_are_adopted_on_restart_and_maps_keep_their_contents(lb: lb_engine.SocketLB,
                                                                       servers: Servers) -> None:
    tcp = servers.ports("tcp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", tcp[0])]),)))
    again = lb_engine.SocketLB(NODE, cgroup=lb.cgroup)
    from ciliary.nodeagent.datapath import compiling
    before = compiling.compile_count()
    again.start()
    try:
        assert compiling.compile_count() == before  # adopted by hash, nothing compiled
        assert again.observe() == lb.observe()
    finally:
        again.close()


def test_the_policy_datapath_on_the_same_node_leaves_the_load_balancer_pinned(lb: lb_engine.SocketLB) -> None:
    """Both engines pin into one directory; the policy engine prunes its stale ``prog_*`` pins, never ours."""
    from ciliary.nodeagent.datapath import engine
    from ciliary.operator.intents import NodeIntent

    ours = sorted(p.name for p in lb.pin_dir.glob(f"{lb_engine.PIN_PREFIX}*"))
    assert len(ours) == len(lb_engine.HOOKS)
    policy = engine.Datapath(NODE)
    policy.start()
    try:
        policy.apply(NodeIntent(node=NODE, revision=1), {})
        assert sorted(p.name for p in lb.pin_dir.glob(f"{lb_engine.PIN_PREFIX}*")) == ours
        assert lb.observe() is not None  # the LB maps are still there and readable
    finally:
        policy.close()
        for pinned in lb.pin_dir.glob("prog_*"):
            pinned.unlink()
        for name in set(engine.MAP_NAMES) - set(lb_engine.TRAIL_MAP_NAMES):  # those two the LB programs use too
            (lb.pin_dir / name).unlink(missing_ok=True)


UDP_CHILD = r"""
import socket, sys
vip, port, sockets, per_socket = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(sockets):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for j in range(per_socket):
        s.sendto(f"{i}".encode(), (vip, port))
    s.close()
"""


def test_unconnected_udp_keeps_one_backend_per_socket(lb: lb_engine.SocketLB, servers: Servers) -> None:
    udp = servers.ports("udp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(5300, "UDP", [("127.0.0.1", p) for p in udp]),)))
    procs = str(lb.cgroup / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", UDP_CHILD, VIP, "5300", "12", "5"], preexec_fn=enter,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    by_socket: dict[str, set[int]] = {}
    for index, server in enumerate(servers.udp):
        server.settimeout(0.5)
        while True:
            try:
                data, _ = server.recvfrom(100)
            except TimeoutError:
                break
            by_socket.setdefault(data.decode(), set()).add(index)
    assert len(by_socket) == 12 and all(len(v) == 1 for v in by_socket.values()), by_socket  # 5 datagrams, 1 backend
    assert {i for v in by_socket.values() for i in v} == {0, 1}  # and the sockets spread over both


def test_affinity_ends_with_its_timeout_and_never_outlives_its_backend(lb: lb_engine.SocketLB,
                                                                       servers: Servers) -> None:
    tcp = servers.ports("tcp")
    both = frontend(80, "TCP", [("127.0.0.1", p) for p in tcp], affinity_timeout=1)
    lb.apply(NodeLBIntent(node=NODE, frontends=(both,)))
    in_cgroup(lb, [(VIP, 80)] * 10)
    (first,) = set(accepted_by(servers, 10))
    # the affine backend leaves the Service: the next connects go to the other one, never to it
    remaining = tcp[1 - first]
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", remaining)],
                                                         affinity_timeout=1),)))
    in_cgroup(lb, [(VIP, 80)] * 5)
    assert accepted_by(servers, 5) == [1 - first] * 5
    # after the timeout, choices spread again over both backends
    lb.apply(NodeLBIntent(node=NODE, frontends=(both,)))
    picks: set[int] = set()
    for _ in range(10):  # bounded: each round lets the affinity entry expire, then connects once
        time.sleep(1.1)
        in_cgroup(lb, [(VIP, 80)])
        picks |= set(accepted_by(servers, 1))
        if picks == {0, 1}:
            break
    assert picks == {0, 1}


@pytest.fixture
def four_servers() -> Iterator[Servers]:
    s = Servers(4)
    try:
        yield s
    finally:
        s.close()


def test_random_intents_behave_as_written_in_the_kernel(lb: lb_engine.SocketLB, four_servers: Servers) -> None:
    """A derandomized sample of intents (frontends, backend sets, empty ones, Local ones) applied one after the
    other: every connect lands on a backend of its frontend, or fails as the frontend says."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tcp = four_servers.ports("tcp")
    shapes = st.lists(st.tuples(st.sampled_from([80, 81, 82, 83]),
                                st.lists(st.integers(0, 3), unique=True, max_size=3), st.booleans()),
                      min_size=1, max_size=4, unique_by=lambda t: t[0])

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(shapes)
    def check(shape: list[tuple[int, list[int], bool]]) -> None:
        fes = tuple(frontend(port, "TCP", [("127.0.0.1", tcp[i]) for i in idx],
                             no_local_backends=local and not idx) for port, idx, local in shape)
        lb.apply(NodeLBIntent(node=NODE, frontends=fes))
        for port, idx, local in shape:
            (line,) = in_cgroup(lb, [(VIP, port)])
            hits = accepted_by(four_servers, 1)
            if not idx:
                assert line == f"error {errno.EPERM if local else errno.ECONNREFUSED}" and hits == []
            else:
                assert line == f"peer {VIP}:{port}" and len(hits) == 1 and hits[0] in idx, (shape, line, hits)

    check()


def bind_in_cgroup(engine: lb_engine.SocketLB, port: int, *, kind: int = socket.SOCK_STREAM,
                   own_netns: bool = False, address: str = "0.0.0.0") -> str:
    """bind(address:port) from a child in the cgroup (optionally in a network namespace of its own)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            (engine.cgroup / "cgroup.procs").write_text(str(os.getpid()))
            if own_netns:
                import ctypes
                if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET: like a pod
                    raise OSError(ctypes.get_errno(), "unshare")
            s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind)
            try:
                s.bind((address, port))
                result = "bound"
            except OSError as exc:
                result = f"error {exc.errno}"
            s.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = f"crash {exc!r}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    out = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return out


def test_host_processes_cannot_bind_a_nodeport_and_pods_can(lb: lb_engine.SocketLB) -> None:
    nodeport = FrontendIntent(service="default/web", kind=FrontendKind.NODE_PORT, address="192.0.2.250",
                              port=31234, protocol="TCP")
    lb.apply(NodeLBIntent(node=NODE, frontends=(nodeport,)))
    try:
        assert bind_in_cgroup(lb, 31234) == f"error {errno.EADDRINUSE}"
        assert bind_in_cgroup(lb, 31234, kind=socket.SOCK_DGRAM) == "bound"  # a TCP NodePort only
        assert bind_in_cgroup(lb, 31235) == "bound"
        assert bind_in_cgroup(lb, 31234, own_netns=True) == "bound"  # a pod's namespace is its own
        assert bind_in_cgroup(lb, 31234, address="::") == f"error {errno.EADDRINUSE}"  # IPv6 wildcard too
        assert bind_in_cgroup(lb, 31234, address="::ffff:127.0.0.1") == f"error {errno.EADDRINUSE}"
    finally:
        lb.apply(NodeLBIntent(node=NODE))
    assert bind_in_cgroup(lb, 31234) == "bound"  # the Service is gone: the port is free again


def test_ipv6_sockets_reach_an_ipv4_service_through_its_mapped_address(lb: lb_engine.SocketLB,
                                                                       servers: Servers) -> None:
    """An IPv6 socket (as dual-stack runtimes open) asking for ``::ffff:<ClusterIP>`` is translated like an
    IPv4 one: TCP reaches both backends and getpeername shows the frontend; a UDP reply shows it too;
    no backends refuses at once; a plain IPv6 destination passes untouched."""
    tcp, udp = servers.ports("tcp"), servers.ports("udp")
    lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", p) for p in tcp]),
                                                frontend(53, "UDP", [("127.0.0.1", udp[0])]),
                                                frontend(81, "TCP", []))))
    mapped = f"::ffff:{VIP}"
    lines = in_cgroup(lb, [(mapped, 80)] * 30, family=socket.AF_INET6)
    assert lines == [f"peer {mapped}:80"] * 30, lines
    hits = accepted_by(servers, 30)
    assert len(hits) == 30 and set(hits) == {0, 1}, hits
    import threading

    def echo() -> None:
        data, peer = servers.udp[0].recvfrom(100)
        servers.udp[0].sendto(data, peer)

    t = threading.Thread(target=echo)
    t.start()
    assert in_cgroup(lb, [(mapped, 53)], udp=True, family=socket.AF_INET6) == [f"udp-peer {mapped}:53"]
    t.join(5)
    assert in_cgroup(lb, [(mapped, 81)], family=socket.AF_INET6) == [f"error {errno.ECONNREFUSED}"]
    # not IPv4-mapped: untouched (nothing routes this documentation prefix: the kernel says so at once)
    assert in_cgroup(lb, [("2001:db8::1", 80)], family=socket.AF_INET6)[0] in (
        f"error {errno.ENETUNREACH}", f"error {errno.EHOSTUNREACH}", "error None")


def test_entries_changed_behind_the_engines_back_are_found_and_put_right(lb: lb_engine.SocketLB,
                                                                         servers: Servers) -> None:
    """The engine plans from what it wrote, not from a read of the kernel each time; its periodic read-back
    (``resync``) finds an entry someone else deleted, and the next apply of the same intent writes it again."""
    tcp = servers.ports("tcp")
    wanted = NodeLBIntent(node=NODE, frontends=(frontend(80, "TCP", [("127.0.0.1", tcp[0])]),))
    lb.apply(wanted)
    assert lb.resync() is False  # nothing changed
    assert lb.apply(wanted).map_writes == 0
    slot = lb_planning.ServiceKey(IPv4Address(VIP), 80, 6, 1)
    assert slot in lb.observe().services
    maps._delete(lb._map_fds["cy_lb4_svc"], lb_engine.SERVICES, slot)
    assert lb.resync() is True
    assert lb.apply(wanted).map_writes == 1
    assert slot in lb.observe().services and lb.resync() is False
    in_cgroup(lb, [(VIP, 80)])
    assert accepted_by(servers, 1) == [0]


class TrailKeyC(ct.Structure):
    """``struct lb4_trail_key`` (include/lb_trail_maps.h)."""

    _fields_ = [("pod", ct.c_uint32), ("backend", ct.c_uint32), ("port", ct.c_uint16), ("sport", ct.c_uint16),
                ("proto", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class TrailC(ct.Structure):
    _fields_ = [("at_ns", ct.c_uint64), ("address", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


TRAIL = maps.Codec(
    "cy_lb4_trail", TrailKeyC, TrailC,
    lambda k: TrailKeyC(maps.addr_to_u32(IPv4Address(k[0])), maps.addr_to_u32(IPv4Address(k[1])),
                        socket.htons(k[2]), socket.htons(k[3]), k[4]),
    lambda k: (str(maps.u32_to_addr(k.pod)), str(maps.u32_to_addr(k.backend)), socket.ntohs(k.port),
               socket.ntohs(k.sport), k.proto),
    lambda v: TrailC(0, maps.addr_to_u32(IPv4Address(v[0])), socket.htons(v[1])),
    lambda v: (str(maps.u32_to_addr(v.address)), socket.ntohs(v.port)))
"""(pod, backend, backend port, source port, protocol) -> (frontend address, port); the time left out."""

NEW_NETNS_CONNECT = r"""
import ctypes, socket, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET: a namespace nobody registered
    sys.exit("unshare failed")
s = socket.socket()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError as exc:
    print(exc.errno)
"""

UDP_SENDS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(2):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1])
"""


def run_in_cgroup(lb: lb_engine.SocketLB, code: str, *args: str) -> str:
    procs = str(lb.cgroup / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30,
                         preexec_fn=enter)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_load_balancer_source_ranges_hold_for_pods_and_not_for_the_nodes_own_processes(
        lb: lb_engine.SocketLB, servers: Servers) -> None:
    """A socket whose network namespace is a pod's (``cy_lb4_podns``, as the policy engine writes it from the CNI
    plugin's cookie) reaches a load balancer IP only from inside its ``loadBalancerSourceRanges`` (EPERM at
    ``connect()`` and ``sendto()`` otherwise, as kube-proxy drops); an IPv6-only list admits no pod; the node's own
    processes are admitted; a namespace that is neither (a pod never registered) is refused (fail closed); a
    ClusterIP frontend carrying the same ranges is not restricted (the resolver gives ranges to load balancer
    frontends only: ``test_load_balancer_source_ranges_restrict_only_the_load_balancer_frontends``)."""
    tcp, udp = servers.ports("tcp"), servers.ports("udp")
    podns_fd = loading.open_pinned(lb.pin_dir / "cy_lb4_podns")
    own = netns_sockets.netns_cookie(None)

    def with_ranges(kind: FrontendKind, port: int, protocol: str, backend: int,
                    ranges: tuple[str, ...]) -> FrontendIntent:
        return FrontendIntent(service="default/web", kind=kind, address=VIP, port=port, protocol=protocol,
                              backends=(BackendIntent(address="127.0.0.1", port=backend),), source_ranges=ranges)

    lb_kind = FrontendKind.LOAD_BALANCER
    try:
        lb.apply(NodeLBIntent(node=NODE, frontends=(
            with_ranges(lb_kind, 80, "TCP", tcp[0], ("10.244.9.0/24",)),
            with_ranges(lb_kind, 81, "TCP", tcp[0], ("192.0.2.0/24",)),
            with_ranges(lb_kind, 82, "TCP", tcp[0], ("2001:db8::/32",)),
            with_ranges(lb_kind, 53, "UDP", udp[0], ("192.0.2.0/24",)),
            with_ranges(FrontendKind.CLUSTER_IP, 83, "TCP", tcp[0], ("192.0.2.0/24",)))))
        ports = (80, 81, 82, 83)
        assert in_cgroup(lb, [(VIP, p) for p in ports]) == [f"peer {VIP}:{p}" for p in ports]  # the node's own
        accepted_by(servers, 4)
        assert run_in_cgroup(lb, NEW_NETNS_CONNECT, VIP, "80") == str(errno.EPERM)  # registered nowhere
        assert run_in_cgroup(lb, NEW_NETNS_CONNECT, VIP, "83") == str(errno.ENETUNREACH)  # not restricted
        maps.sync_map(podns_fd, maps.POD_NETNS, {own: IPv4Address("10.244.9.9")})  # now this namespace is a pod's
        assert in_cgroup(lb, [(VIP, p) for p in ports]) == [
            f"peer {VIP}:80", f"error {errno.EPERM}", f"error {errno.EPERM}", f"peer {VIP}:83"]
        assert accepted_by(servers, 2) == [0, 0]
        assert in_cgroup(lb, [(VIP, 53)], udp=True) == [f"error {errno.EPERM}"]
    finally:
        maps.sync_map(podns_fd, maps.POD_NETNS, {})
        os.close(podns_fd)


def test_a_pods_translations_leave_trails_under_its_source_port_once_it_has_one(
        lb: lb_engine.SocketLB, servers: Servers) -> None:
    """A registered pod's unconnected UDP socket is bound when its sends are translated: the trails (frontend, and
    the key the pod program looks up) carry its source port; a TCP connect() leaves port 0 (not bound yet); the
    node's own sockets leave none."""
    tcp, udp = servers.ports("tcp"), servers.ports("udp")
    podns_fd = loading.open_pinned(lb.pin_dir / "cy_lb4_podns")
    trail_fd = loading.open_pinned(lb.pin_dir / "cy_lb4_trail")
    try:
        maps.sync_map(trail_fd, TRAIL, {})
        lb.apply(NodeLBIntent(node=NODE, frontends=(frontend(5353, "UDP", [("127.0.0.1", udp[0])]),
                                                    frontend(80, "TCP", [("127.0.0.1", tcp[0])]))))
        in_cgroup(lb, [(VIP, 80)])
        assert maps.read_map(trail_fd, TRAIL) == {}  # the node's own socket
        maps.sync_map(podns_fd, maps.POD_NETNS, {netns_sockets.netns_cookie(None): IPv4Address("10.244.9.9")})
        sport = int(run_in_cgroup(lb, UDP_SENDS, VIP, "5353"))
        in_cgroup(lb, [(VIP, 80)])
        trails = maps.read_map(trail_fd, TRAIL)
        assert set(trails) == {("10.244.9.9", "127.0.0.1", udp[0], sport, 17),
                               ("10.244.9.9", "127.0.0.1", tcp[0], 0, 6)}, trails
        assert {value for value in trails.values()} == {(VIP, 5353), (VIP, 80)}
        accepted_by(servers, 2)
    finally:
        maps.sync_map(podns_fd, maps.POD_NETNS, {})
        maps.sync_map(trail_fd, TRAIL, {})
        os.close(podns_fd)
        os.close(trail_fd)


def test_a_pinned_trail_map_of_another_shape_is_replaced_once(lb: lb_engine.SocketLB) -> None:
    """``loading.ensure_pinned_maps``: a map of an older layout (a 12-byte key) is unpinned and one of the wanted
    shape pinned; a second call keeps it."""
    pin_dir = lb.pin_dir / "shape-test"
    pin_dir.mkdir()
    try:
        old = libbpf.map_create(maps.BPF_MAP_TYPE_LRU_HASH, "cy_lb4_trail", 12, 16, 16384)
        loading.pin(old, pin_dir / "cy_lb4_trail")
        os.close(old)
        loading.ensure_pinned_maps(pin_dir, maps.TRAIL_MAPS)
        first = loading.pinned_map_info(pin_dir / "cy_lb4_trail")
        assert first is not None and (first.type, first.key_size, first.value_size, first.max_entries) == \
            maps.TRAIL_MAPS["cy_lb4_trail"]
        loading.ensure_pinned_maps(pin_dir, maps.TRAIL_MAPS)
        again = loading.pinned_map_info(pin_dir / "cy_lb4_trail")
        assert again is not None and again.id == first.id
        podns = loading.pinned_map_info(pin_dir / "cy_lb4_podns")
        assert podns is not None and podns.type == maps.BPF_MAP_TYPE_HASH
    finally:
        for pinned in pin_dir.iterdir():
            pinned.unlink()
        pin_dir.rmdir()
