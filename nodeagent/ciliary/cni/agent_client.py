"""The plugin's side of the node agent's endpoint API: HTTP/1.1 over a unix socket.

Standard library only (``http.client`` with an AF_UNIX connection) so the plugin
starts fast. The agent owns the API; its contract (see
``ciliary.nodeagent.endpoint_api``):

- ``POST /v1/endpoints`` with :class:`EndpointPayload` JSON → 201 created / 200 unchanged;
- ``DELETE /v1/endpoints/<containerId>`` → 200 (also when unknown).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any, TypedDict

DEFAULT_TIMEOUT_S = 10.0


class EndpointPayload(TypedDict):
    """The body of ``POST /v1/endpoints`` (camelCase, as on the wire)."""

    containerId: str
    podNamespace: str
    podName: str
    podUid: str
    netns: str
    ifname: str
    hostIfname: str
    hostIfindex: int
    mac: str
    ipv4: str
    netnsCookie: int


DATAPATH_OFF = "datapath off"
"""The ``error`` of the agent's 503 answer when it runs without its datapath (``endpoint_api.DATAPATH_OFF``)."""


class AgentUnreachableError(Exception):
    """The socket is missing, refuses connections or the agent did not answer in time."""


class AgentRejectedError(Exception):
    """The agent answered with a non-2xx status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"agent answered HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a unix stream socket."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Calls the local agent; one short-lived connection per request."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def add_endpoint(self, payload: EndpointPayload) -> dict[str, Any]:
        return self._request("POST", "/v1/endpoints", payload)

    def delete_endpoint(self, container_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/endpoints/{urllib.parse.quote(container_id, safe='')}", None)

    def _request(self, method: str, path: str, body: object | None) -> dict[str, Any]:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            raise AgentUnreachableError(f"{method} {path} via {self.socket_path}: {exc}") from exc
        finally:
            conn.close()
        if not 200 <= response.status < 300:
            raise AgentRejectedError(response.status, text)
        try:
            decoded = json.loads(text) if text else {}
        except json.JSONDecodeError:
            decoded = {"raw": text}
        return decoded if isinstance(decoded, dict) else {"value": decoded}
