"""A minimal apiserver client for the kube-proxy bench: create Services and EndpointSlices in bulk, patch one.

Plain HTTPS with the lab's admin client certificate, one keep-alive connection per worker thread, so
thousands of objects are created at the apiserver's pace rather than kubectl's (one process per call).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PATHS = {"Service": "/api/v1/namespaces/{ns}/services",
         "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"}


class ApiError(RuntimeError):
    """The apiserver refused a request; carries the path and status."""

    def __init__(self, path: str, status: int, body: str) -> None:
        super().__init__(f"{path}: HTTP {status}: {body[:300]}")
        self.path = path
        self.status = status


class Api:
    def __init__(self, host: str, port: int, *, ca: Path, cert: Path, key: Path, workers: int = 8) -> None:
        self.host, self.port, self.workers = host, port, workers
        self.context = ssl.create_default_context(cafile=str(ca))
        self.context.load_cert_chain(str(cert), str(key))
        self.local = threading.local()
        self.connections: list[http.client.HTTPSConnection] = []
        self.lock = threading.Lock()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def request(self, method: str, path: str, body: Any, content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in range(2):  # a keep-alive connection the server closed is reopened once
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                text = resp.read().decode(errors="replace")
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
                continue
            if resp.status >= 300:
                raise ApiError(path, resp.status, text)
            return dict(json.loads(text))
        raise AssertionError("unreachable")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        path = PATHS[obj["kind"]].format(ns=obj["metadata"]["namespace"])
        return self.request("POST", path, obj)

    def json_patch(self, path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", path, ops, "application/json-patch+json")

    def create_pairs(self, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Create each (Service, EndpointSlice) pair, the Service first, ``workers`` pairs at a time."""
        def one(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
            self.create(pair[0])
            self.create(pair[1])

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for done in pool.map(one, pairs):
                del done

    def close(self) -> None:
        with self.lock:
            for conn in self.connections:
                conn.close()
            self.connections.clear()
