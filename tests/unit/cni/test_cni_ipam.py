"""IPAM over a temporary directory: allocation order, release, exhaustion, persistence, concurrency."""

import threading
from ipaddress import IPv4Address, IPv4Network

import pytest

from ciliary.cni import errors, ipam


def make_store(tmp_path, subnet="10.9.0.0/29"):
    return ipam.IpamStore(tmp_path / "net", IPv4Network(subnet), lock_timeout=5)


def test_skips_network_gateway_and_broadcast(tmp_path):
    store = make_store(tmp_path)  # .0 network, .1 reserved, .7 broadcast -> .2 ... .6
    got = [store.allocate(f"c{i}", "eth0") for i in range(5)]
    assert got == [IPv4Address(f"10.9.0.{n}") for n in range(2, 7)]


def test_exhaustion_is_code_100_naming_the_subnet(tmp_path):
    store = make_store(tmp_path, "10.9.0.0/30")
    assert store.allocate("c1", "eth0") == IPv4Address("10.9.0.2")
    with pytest.raises(errors.CniError) as caught:
        store.allocate("c2", "eth0")
    assert caught.value.code == errors.ErrorCode.POD_CIDR_EXHAUSTED == 100
    assert "10.9.0.0/30" in caught.value.msg


def test_same_container_gets_its_existing_address(tmp_path):
    store = make_store(tmp_path)
    assert store.allocate("c1", "eth0") == store.allocate("c1", "eth0")
    assert len(store.allocations()) == 1


def test_release_frees_and_is_idempotent(tmp_path):
    store = make_store(tmp_path)
    address = store.allocate("c1", "eth0")
    assert store.release("c1", "eth0") == [address]
    assert store.release("c1", "eth0") == []
    assert store.lookup("c1", "eth0") is None
    assert store.allocations() == {}


def test_release_only_touches_the_owner(tmp_path):
    store = make_store(tmp_path)
    a = store.allocate("c1", "eth0")
    b = store.allocate("c2", "eth0")
    store.release("c1", "eth0")
    assert store.allocations() == {b: ipam.Reservation("c2", "eth0")}
    assert a not in store.allocations()


def test_continues_after_last_reserved_instead_of_reusing(tmp_path):
    store = make_store(tmp_path)
    first = store.allocate("c1", "eth0")
    store.release("c1", "eth0")
    second = store.allocate("c2", "eth0")
    assert second != first
    assert second == IPv4Address("10.9.0.3")


def test_wraps_around_to_freed_addresses(tmp_path):
    store = make_store(tmp_path, "10.9.0.0/30")
    store.allocate("c1", "eth0")
    store.release("c1", "eth0")
    assert store.allocate("c2", "eth0") == IPv4Address("10.9.0.2")


def test_persisted_layout_survives_a_new_store(tmp_path):
    store = make_store(tmp_path)
    address = store.allocate("cid-123", "eth0")
    assert (tmp_path / "net" / str(address)).read_text() == "cid-123\neth0\n"
    assert (tmp_path / "net" / ipam.LAST_RESERVED_FILE).read_text() == str(address)
    again = make_store(tmp_path)
    assert again.lookup("cid-123", "eth0") == address
    assert again.allocate("other", "eth0") != address


def test_foreign_files_and_other_subnets_are_ignored(tmp_path):
    store = make_store(tmp_path)
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "README").write_text("x")
    (tmp_path / "net" / "192.168.0.9").write_text("someone\neth0\n")
    assert store.allocate("c1", "eth0") == IPv4Address("10.9.0.2")
    assert list(store.allocations()) == [IPv4Address("10.9.0.2")]


def test_concurrent_allocations_never_collide(tmp_path):
    store_dir = tmp_path
    results: list[IPv4Address] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            address = make_store(store_dir, "10.9.0.0/26").allocate(f"c{i}", "eth0")
        except errors.CniError as exc:  # collected and asserted below
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(address)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures
    assert len(results) == 40
    assert len(set(results)) == 40


def test_lock_timeout_is_try_again_later(tmp_path):
    import fcntl
    import os

    store = make_store(tmp_path)
    store.data_dir.mkdir(parents=True)
    fd = os.open(store.data_dir / ipam.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        store.lock_timeout = 0.1
        with pytest.raises(errors.CniError) as caught:
            store.allocate("c1", "eth0")
        assert caught.value.code == errors.ErrorCode.TRY_AGAIN_LATER == 11
    finally:
        os.close(fd)
