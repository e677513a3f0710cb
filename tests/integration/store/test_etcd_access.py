"""etcd locked down for real: mutual TLS, authentication on, the roles of ``store.access``.

Against the session's lab etcd (TLS only, ``--client-cert-auth``, auth enabled): every key
class is read and written with a node agent's credentials, the operator's, the Hubble relay's and the CLI's
(``ciliary-reader``), and the
outcome must be exactly what the access rules say; clients without a certificate, with a
certificate of another CA, or over plain HTTP are refused; and the components refuse a
plain-HTTP endpoint unless ``--etcd-insecure`` is given, logging a warning when it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest

from ciliary.lab import processes
from ciliary.operator.store import access, accounts, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, TLSClient, make_client

pytestmark = pytest.mark.integration

TAG = secrets.token_hex(3)
OWN, OTHER, PREFIXED = f"cyt-acc-{TAG}-1", f"cyt-acc-{TAG}-2", f"cyt-acc-{TAG}-10"  # -1 prefixes -10


def key_classes() -> dict[str, str]:
    return {
        "own intent": keyspace.node_intent_key(OWN),
        "other node's intent": keyspace.node_intent_key(OTHER),
        "intent of a node whose name it prefixes": keyspace.node_intent_key(PREFIXED),
        "own lb intent": keyspace.node_lb_intent_key(OWN, "manifest"),
        "own lb shard": keyspace.node_lb_intent_key(OWN, "s07"),
        "other node's lb intent": keyspace.node_lb_intent_key(OTHER, "manifest"),
        "lb intent of a node whose name it prefixes": keyspace.node_lb_intent_key(PREFIXED, "manifest"),
        "lb shard of a node whose name it prefixes": keyspace.node_lb_intent_key(PREFIXED, "s07"),
        "own registration": keyspace.node_key(OWN),
        "other node's registration": keyspace.node_key(OTHER),
        "own status": keyspace.node_status_key(OWN),
        "other node's status": keyspace.node_status_key(PREFIXED),
        "own report": keyspace.report_key(f"uid-{TAG}", OWN),
        "other node's report": keyspace.report_key(f"uid-{TAG}", PREFIXED),
        "identity": keyspace.identity_id_key(900_000 + int(TAG, 16) % 1000),
        "identity index": keyspace.identity_labels_key(f"acc{TAG}"),
        "operator election key": f"{access.OPERATOR_PREFIX}v1/acc-{TAG}",
        "kubernetes objects": f"/registry/ciliary-acc-{TAG}",
    }


async def attempt(client: aetcd.Client, key: str, *, write: bool) -> bool:
    """True when etcd let ``client`` read/write ``key``; False on 'permission denied' (anything else fails)."""
    try:
        if write:
            await client.put(key.encode(), b"written by the access test")
        else:
            await client.get(key.encode())
    except aetcd.ClientError as exc:
        if "permission denied" in str(exc):
            return False
        raise
    return True


async def matrix(client: aetcd.Client) -> dict[str, tuple[bool, bool]]:
    return {what: (await attempt(client, key, write=False), await attempt(client, key, write=True))
            for what, key in key_classes().items()}


@pytest.fixture(scope="module")
def creds(kube: Any) -> dict[str, EtcdTLS]:
    return {"node": kube.etcd_node_tls(OWN), "operator": kube.etcd_tls(access.OPERATOR_USER),
            "relay": kube.etcd_tls(access.RELAY_USER), "reader": kube.etcd_tls(access.READER_USER),
            "root": kube.etcd_tls(access.ROOT_USER)}


def run(kube: Any, tls: EtcdTLS | None, body: Any, *, timeout: float = 5.0, endpoint: str | None = None) -> Any:
    async def go() -> Any:
        client = make_client(EtcdEndpoint.parse(endpoint or kube.etcd_endpoint), tls, timeout)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(go())


def cleanup(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    async def wipe(client: aetcd.Client) -> None:
        for key in key_classes().values():
            await client.delete(key.encode())

    run(kube, creds["root"], wipe)


def test_a_node_agent_reaches_exactly_its_own_keys(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    try:
        got = run(kube, creds["node"], matrix)
        role = access.node_role(OWN)
        expected = {what: (role.allows(key, write=False), role.allows(key, write=True))
                    for what, key in key_classes().items()}
        assert got == expected
        # the claims of the issue, spelled out
        assert got["own intent"] == (True, False)
        assert got["other node's intent"] == (False, False)
        assert got["intent of a node whose name it prefixes"] == (False, False)
        assert got["own lb intent"] == (True, False) and got["own lb shard"] == (True, False)
        assert got["other node's lb intent"] == (False, False)
        assert got["lb intent of a node whose name it prefixes"] == (False, False)
        assert got["lb shard of a node whose name it prefixes"] == (False, False)
        assert not any(write for what, (_, write) in got.items() if not what.startswith("own "))
        assert got["identity"] == (True, False) and got["own registration"] == (True, True)
        print("\nnode agent:", got)
    finally:
        cleanup(kube, creds)


def test_the_operator_writes_intents_and_identities_and_reads_what_agents_write(
        kube: Any, creds: dict[str, EtcdTLS]) -> None:
    try:
        got = run(kube, creds["operator"], matrix)
        role = access.operator_role()
        expected = {what: (role.allows(key, write=False), role.allows(key, write=True))
                    for what, key in key_classes().items()}
        assert got == expected
        assert got["other node's intent"] == (True, True) and got["identity"] == (True, True)
        assert got["other node's lb intent"] == (True, True)
        assert got["own report"] == (True, False) and got["own registration"] == (True, False)
        assert got["kubernetes objects"] == (False, False)
        print("\noperator:", got)
    finally:
        cleanup(kube, creds)


def test_the_relay_reads_the_node_records_and_writes_nothing(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    try:
        got = run(kube, creds["relay"], matrix)
        role = access.relay_role()
        expected = {what: (role.allows(key, write=False), role.allows(key, write=True))
                    for what, key in key_classes().items()}
        assert got == expected
        assert got["own registration"] == (True, False) and got["other node's registration"] == (True, False)
        assert not any(write for _read, write in got.values()), "the relay writes nothing, no intent above all"
        assert [what for what, (read, _w) in got.items() if read] == ["own registration", "other node's registration"]
        print("\nrelay:", got)
    finally:
        cleanup(kube, creds)


def test_the_cli_reader_reads_intents_and_agent_records_and_writes_nothing(
        kube: Any, creds: dict[str, EtcdTLS]) -> None:
    try:
        got = run(kube, creds["reader"], matrix)
        role = access.reader_role()
        expected = {what: (role.allows(key, write=False), role.allows(key, write=True))
                    for what, key in key_classes().items()}
        assert got == expected
        assert not any(write for _read, write in got.values()), "the CLI's certificate writes nothing"
        for what in ("own intent", "other node's intent", "own lb shard", "own registration", "own status",
                     "own report", "identity"):
            assert got[what] == (True, False), what
        assert got["operator election key"] == (False, False) and got["kubernetes objects"] == (False, False)
        print("\nreader:", got)
    finally:
        cleanup(kube, creds)


async def first_watch_response(client: aetcd.Client, key: str) -> Any:
    """etcd's answer to creating a watch on ``key`` (aetcd hides a cancelled creation: ask the stub)."""
    from aetcd import rpc

    await client.connect()
    requests = [rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key.encode()))]

    async def feed() -> Any:
        for request in requests:
            yield request
        await asyncio.sleep(10)

    call = rpc.WatchStub(client.channel).Watch(feed(), timeout=10)
    try:
        return await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()


def test_a_node_cannot_list_intents_or_watch_another_nodes_intent(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    async def body(client: aetcd.Client) -> None:
        with pytest.raises(aetcd.ClientError, match="permission denied"):
            await client.get_prefix(keyspace.INTENTS_PREFIX.encode())
        with pytest.raises(aetcd.ClientError, match="permission denied"):
            await client.get_prefix(keyspace.REPORTS_PREFIX.encode())
        theirs = await first_watch_response(client, keyspace.node_intent_key(OTHER))
        assert theirs.canceled and "permission denied" in theirs.cancel_reason
        mine = await first_watch_response(client, keyspace.node_intent_key(OWN))
        assert mine.created and not mine.canceled

    run(kube, creds["node"], body)


def test_a_node_reads_and_watches_its_whole_lb_prefix_and_no_wider_range(
        kube: Any, creds: dict[str, EtcdTLS]) -> None:
    """The agent's LB reads: one range read of its prefix, a watch of it; node-1's range ends before node-10's."""
    own, prefixed = keyspace.node_lb_intent_prefix(OWN), keyspace.node_lb_intent_prefix(PREFIXED)

    async def operator_writes(client: aetcd.Client) -> None:
        await asyncio.sleep(0.5)
        await client.put((own + "manifest").encode(), b"m")
        await client.put((prefixed + "manifest").encode(), b"theirs")  # inside node-1's range? must not be
        await asyncio.sleep(0.5)
        await client.put((own + "s01").encode(), b"shard")

    async def node(client: aetcd.Client) -> None:
        end = access.prefix_range_end(own).encode()
        watch = await client.watch(own.encode(), range_end=end)
        writer = asyncio.create_task(asyncio.to_thread(run, kube, creds["operator"], operator_writes))
        events = [await asyncio.wait_for(watch.__aiter__().__anext__(), 10) for _ in range(2)]
        await writer
        await watch.cancel()
        assert [bytes(e.kv.key).decode() for e in events] == [own + "manifest", own + "s01"]
        rows = await client.get_range(own.encode(), end)
        assert {bytes(kv.key).decode() for kv in rows} == {own + "manifest", own + "s01"}
        for wider in (keyspace.LB_INTENTS_PREFIX, own[:-1], prefixed):
            with pytest.raises(aetcd.ClientError, match="permission denied"):
                await client.get_range(wider.encode(), access.prefix_range_end(wider).encode())
        theirs = await first_watch_response(client, prefixed + "manifest")
        assert theirs.canceled and "permission denied" in theirs.cancel_reason

    async def wipe(client: aetcd.Client) -> None:
        for prefix in (own, prefixed):
            await client.delete_prefix(prefix.encode())

    try:
        run(kube, creds["node"], node, timeout=15)
    finally:
        run(kube, creds["root"], wipe)


def test_a_node_watches_its_intent_and_its_lease_bound_keys_go_with_the_lease(
        kube: Any, creds: dict[str, EtcdTLS]) -> None:
    async def operator_writes(client: aetcd.Client) -> None:
        await asyncio.sleep(0.5)
        await client.put(keyspace.node_intent_key(OWN).encode(), b"intent-1")

    async def node(client: aetcd.Client) -> None:
        watch = await client.watch(keyspace.node_intent_key(OWN).encode())
        writer = asyncio.create_task(asyncio.to_thread(run, kube, creds["operator"], operator_writes))
        event = await asyncio.wait_for(watch.__aiter__().__anext__(), 10)
        await writer
        assert bytes(event.kv.value) == b"intent-1"
        await watch.cancel()
        lease = await client.lease(30)
        await client.put(keyspace.node_key(OWN).encode(), b"registered", lease=lease)
        await client.put(keyspace.report_key(f"uid-{TAG}", OWN).encode(), b"report", lease=lease)
        await lease.refresh()
        await lease.revoke()
        assert await client.get(keyspace.node_key(OWN).encode()) is None
        assert await client.get(keyspace.report_key(f"uid-{TAG}", OWN).encode()) is None

    try:
        run(kube, creds["node"], node, timeout=15)
    finally:
        cleanup(kube, creds)


def connect_with(kube: Any, credentials: grpc.ChannelCredentials) -> Any:
    """A Range call over a channel built from ``credentials``; returns the grpc error or None."""
    async def go() -> Any:
        from aetcd import rpc
        target = kube.etcd_endpoint.removeprefix("https://")
        async with grpc.aio.secure_channel(target, credentials) as channel:
            try:
                await rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/ciliary/"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc
        return None

    return asyncio.run(go())


def test_a_client_without_a_certificate_is_refused(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    error = connect_with(kube, grpc.ssl_channel_credentials(root_certificates=creds["root"].ca_file.read_bytes()))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_of_another_ca_is_refused(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    pki = kube.lab.layout.pki_dir  # the Kubernetes CA's admin certificate (system:masters) is no etcd identity
    error = connect_with(kube, grpc.ssl_channel_credentials(
        root_certificates=creds["root"].ca_file.read_bytes(), private_key=(pki / "admin.key").read_bytes(),
        certificate_chain=(pki / "admin.crt").read_bytes()))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE


def test_plain_http_to_etcd_is_refused(kube: Any) -> None:
    async def go() -> None:
        endpoint = EtcdEndpoint.parse(kube.etcd_endpoint)
        async with aetcd.Client(host=endpoint.host, port=endpoint.port, timeout=3) as client:
            with pytest.raises((aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)):
                await client.get(b"/ciliary/")

    asyncio.run(go())


def test_a_certificate_whose_cn_is_no_etcd_user_has_no_access(kube: Any, tmp_path: Path) -> None:
    certs = kube.lab.etcd_certs()
    stranger = certs.issue(f"cyt-stranger-{TAG}")  # signed by etcd's CA, but no such etcd user

    async def body(client: aetcd.Client) -> None:
        assert isinstance(client, TLSClient)
        for key in (keyspace.node_intent_key(OWN), keyspace.identity_id_key(1)):
            assert not await attempt(client, key, write=False)
            assert not await attempt(client, key, write=True)

    run(kube, stranger, body)


def test_apply_role_converges_to_exactly_the_rules(kube: Any, creds: dict[str, EtcdTLS]) -> None:
    """A grant the rules no longer name is revoked; applying twice changes nothing; delete removes both."""
    from aetcd import rpc

    role = access.node_role(f"cyt-acc-{TAG}-conv")
    wider = access.Role(role.name, role.user,
                        (*role.grants, access.Grant(access.Permission.READWRITE, keyspace.INTENTS_PREFIX, prefix=True)))
    types = {access.Permission.READ: 0, access.Permission.WRITE: 1, access.Permission.READWRITE: 2}
    expected = {(types[g.permission], g.key.encode(), g.range_end.encode()) for g in role.grants}

    async def held(client: aetcd.Client) -> set[tuple[int, bytes, bytes]]:
        got = await rpc.AuthStub(client.channel).RoleGet(rpc.AuthRoleGetRequest(role=role.name), timeout=5)
        return {(int(p.permType), bytes(p.key), bytes(p.range_end)) for p in got.perm}

    async def body(client: aetcd.Client) -> None:
        await accounts.apply_role(client, wider)
        assert len(await held(client)) == len(expected) + 1
        await accounts.apply_role(client, role)
        await accounts.apply_role(client, role)
        assert await held(client) == expected
        await accounts.delete_role(client, role)
        with pytest.raises(rpc.AioRpcError, match="not found"):
            await held(client)

    run(kube, creds["root"], body)


# -- components: https by default, plain HTTP only with --etcd-insecure -----------------------------


def component(argv: list[str], tmp_path: Path, *, wait_for: str, seconds: float = 20) -> tuple[int | None, str]:
    """Run ``argv`` until it exits or its output contains ``wait_for``; returns (exit code or None, output)."""
    log = tmp_path / f"out-{time.monotonic_ns()}.log"  # one file per run: nothing of an earlier process's output
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + seconds
    code: int | None = None
    try:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                break
            if wait_for in log.read_text(errors="replace"):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(3)  # a refusal exits right after printing it
                break
            time.sleep(0.2)
    finally:
        processes.terminate(proc)
    return code, log.read_text(errors="replace")


def agent_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ciliary.nodeagent.main", "--node", f"cyt-acc-{TAG}-agent",
            "--socket", str(tmp_path / "agent.sock"), "--state-dir", str(tmp_path / "state"),
            "--health-addr", "127.0.0.1:0", "--datapath", "off", *extra]


def operator_argv(kube: Any, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ciliary.operator.main", "--kubeconfig", str(kube.kubeconfig), *extra]


def test_components_refuse_plain_http_unless_told_and_then_warn(kube: Any, tmp_path: Path) -> None:
    plain = "http://127.0.0.1:1"  # never reached: the check comes first
    for argv in (agent_argv(tmp_path, "--etcd-endpoints", plain),
                 operator_argv(kube, "--etcd-endpoints", plain)):
        code, out = component(argv, tmp_path, wait_for="refused")
        assert code == 2, out
        assert "plain-HTTP etcd endpoint(s) http://127.0.0.1:1 refused" in out and "--etcd-insecure" in out
    for argv in (agent_argv(tmp_path, "--etcd-endpoints", plain, "--etcd-insecure"),
                 operator_argv(kube, "--etcd-endpoints", plain, "--etcd-insecure")):
        code, out = component(argv, tmp_path, wait_for="plain HTTP (--etcd-insecure)")
        assert "WARNING" in out and "etcd is reached over plain HTTP (--etcd-insecure)" in out, out
        # not refused by the check (exit 2): still trying etcd, or (the operator, ~3 s of retries against an
        # address nobody serves) given up with its own "unavailable" error, exit 1
        assert "plain-HTTP etcd endpoint(s)" not in out and code in (None, 1), out
        assert code is None or "unavailable" in out, out


def test_components_need_a_client_certificate_for_https(kube: Any, tmp_path: Path) -> None:
    tls = kube.etcd_tls()
    for argv in (agent_argv(tmp_path, "--etcd-endpoints", kube.etcd_endpoint, "--etcd-ca-file", str(tls.ca_file)),
                 operator_argv(kube, "--etcd-endpoints", kube.etcd_endpoint, "--etcd-ca-file", str(tls.ca_file))):
        code, out = component(argv, tmp_path, wait_for="need")
        assert code == 2, out
        assert "https etcd endpoints need --etcd-cert-file, --etcd-key-file" in out


def test_the_cli_reads_etcd_with_tls_and_refuses_plain_http(kube: Any, tmp_path: Path) -> None:
    tls = kube.etcd_tls()
    base = [sys.executable, "-m", "ciliary.cli.main", "policy", "get", "--intent", "--node", f"cyt-acc-{TAG}-none"]
    env_free = {"PATH": "/usr/bin:/bin", "CILIARY_LAB_DIR": str(tmp_path / "no-lab")}
    ok = subprocess.run([*base, "--etcd-endpoints", kube.etcd_endpoint, "--etcd-ca-file", str(tls.ca_file),
                         "--etcd-cert-file", str(tls.cert_file), "--etcd-key-file", str(tls.key_file)],
                        capture_output=True, text=True, timeout=60, env=env_free)
    assert "no intent published for node" in ok.stderr, ok.stderr  # it reached etcd and read
    plain = subprocess.run([*base, "--etcd-endpoints", "http://127.0.0.1:1"], capture_output=True, text=True,
                           timeout=60, env=env_free)
    assert plain.returncode != 0 and "refused" in plain.stderr and "--etcd-insecure" in plain.stderr
