"""NodeRegistration against a fake aetcd client: register, refresh, expiry, updates, revoke."""

import asyncio
import json
from types import SimpleNamespace

import aetcd

from ciliary.nodeagent import registration, settings

SETTINGS = settings.load_settings(["--node", "n1", "--lease-ttl", "3", "--etcd-endpoints", "http://a:1,http://b:2",
                                   "--etcd-insecure"], {})


class FakeLease:
    def __init__(self, client, lease_id):
        self.id = lease_id
        self.client = client

    async def refresh(self):
        if self.client.closed:
            raise aetcd.ConnectionFailedError("client closed")
        return SimpleNamespace(TTL=0 if self.id in self.client.expired else 3)

    async def revoke(self):
        self.client.revoked.append(self.id)


class FakeClient:
    def __init__(self, endpoint, timeout):
        self.endpoint = str(endpoint)
        self.puts: list = []
        self.expired: set = set()
        self.revoked: list = []
        self.next_id = 100
        self.fail_next = 0
        self.closed = False

    async def lease(self, ttl):
        if self.fail_next:
            self.fail_next -= 1
            raise aetcd.ConnectionFailedError("down")
        self.next_id += 1
        return FakeLease(self, self.next_id)

    async def put(self, key, value, lease):
        self.puts.append((key, json.loads(value), lease.id))

    async def refresh_lease(self, lease_id):
        return SimpleNamespace(TTL=0 if lease_id in self.expired else 3)

    async def revoke_lease(self, lease_id):
        self.revoked.append(lease_id)

    async def close(self):
        self.closed = True


def make(count=lambda: 0):
    clients: list[FakeClient] = []

    def factory(endpoint, timeout):
        clients.append(FakeClient(endpoint, timeout))
        return clients[-1]

    return registration.NodeRegistration(settings=SETTINGS, endpoint_count=count, client_factory=factory), clients


async def test_register_refresh_reregister_update_and_revoke():
    reg, clients = make(count=lambda: 4)
    assert not reg.registered
    await reg._step()
    client = clients[0]
    key, record, lease_id = client.puts[-1]
    assert key == b"/ciliary/nodes/v1/n1"
    assert record["name"] == "n1" and record["endpoints"] == 4 and record["healthAddr"] == "127.0.0.1:9876"
    assert reg.registered and reg.lease_id == lease_id
    await reg._step()  # plain keep-alive: no new put
    assert len(client.puts) == 1
    client.expired.add(lease_id)
    await reg._step()  # TTL 0: a new lease and a new put
    assert reg.lease_id != lease_id and client.puts[-1][2] == reg.lease_id
    reg.request_update()
    await reg._step()
    assert len(client.puts) == 3
    await reg.close()
    assert client.revoked == [client.puts[-1][2]]
    assert not reg.registered


async def test_run_registers_and_stops():
    reg, clients = make()
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if reg.registered:
            break
    assert reg.registered and reg.etcd_connected
    assert clients[0].endpoint == "http://a:1"
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_connection_failures_are_retried_within_a_call():
    reg, clients = make()
    reg._ensure_client()
    clients[0].fail_next = 2  # fewer than CONNECT_RETRIES
    await reg._step()
    assert reg.registered


async def test_run_rotates_to_the_next_endpoint_when_one_is_down():
    clients: list[FakeClient] = []

    def factory(endpoint, timeout):
        client = FakeClient(endpoint, timeout)
        client.fail_next = 99 if str(endpoint) == "http://a:1" else 0
        clients.append(client)
        return client

    reg = registration.NodeRegistration(settings=SETTINGS, endpoint_count=lambda: 0, client_factory=factory)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if reg.registered:
                break
        assert reg.registered
        assert [c.endpoint for c in clients] == ["http://a:1", "http://b:2"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_lease_that_outlived_its_client_is_refreshed_through_the_new_one():
    """etcd restarted and kept the lease (it extends leases on restart); the client that granted it is gone."""
    reg, clients = make()
    await reg._step()
    lease_id = reg.lease_id
    await reg._drop_client(rotate=False)  # what a lost connection does
    await reg._step()  # refreshed through a new client: the same lease, still registered
    assert len(clients) == 2 and reg.registered and reg.lease_id == lease_id
    clients[1].expired.add(lease_id)
    clients[1].next_id = 200
    await reg._step()  # and its expiry is seen through the new client too
    assert reg.lease_id != lease_id and clients[1].puts[-1][2] == reg.lease_id
