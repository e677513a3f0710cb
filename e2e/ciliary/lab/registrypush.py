"""Push an image from an OCI image layout to a registry over the distribution API (plain HTTP, no auth).

For the lab registry on the root namespace's loopback (``localhost:<port>``). Blobs the registry has are
skipped (``HEAD``); others go up in one request each (``POST`` an upload, ``PUT`` it with its digest,
streamed from the file); the manifest last, under the tag. Returns the manifest digest, which is what
``skaffold`` and the pods then name.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ciliary.lab import ociimage

TIMEOUT = 600


class PushError(RuntimeError):
    """The registry refused a request; carries the image name and what was refused."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def split_reference(reference: str) -> tuple[str, str, str]:
    """``localhost:5000/lab/app:tag`` → (``localhost:5000``, ``lab/app``, ``tag``); the tag defaults to latest."""
    registry, _, rest = reference.partition("/")
    if not rest or ("." not in registry and ":" not in registry and registry != "localhost"):
        raise ValueError(f"{reference!r} names no registry host")
    rest = rest.split("@", 1)[0]
    name, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        name, tag = rest, "latest"
    return registry, name, tag


def _request(method: str, url: str, *, data: Any = None, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers or {})


def push_blob(base: str, name: str, blob: Path, digest: str) -> None:
    status, _ = _request("HEAD", f"{base}/v2/{name}/blobs/{digest}")
    if status == 200:
        return
    status, headers = _request("POST", f"{base}/v2/{name}/blobs/uploads/", data=b"")
    location = headers.get("Location", "")
    if status != 202 or not location:
        raise PushError(name, f"starting the upload of {digest}: HTTP {status}")
    url = location if location.startswith("http") else base + location
    url += ("&" if "?" in url else "?") + f"digest={digest}"
    with blob.open("rb") as body:
        status, _ = _request("PUT", url, data=body, headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(blob.stat().st_size)})
    if status != 201:
        raise PushError(name, f"uploading {digest}: HTTP {status}")


def push_layout(layout: Path, reference: str) -> str:
    """Push the (only) image of ``layout`` as ``reference``; returns its manifest digest."""
    registry, name, tag = split_reference(reference)
    base = f"http://{registry}"
    index = ociimage.read_index(layout)
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        raise PushError(name, f"{layout} holds {len(manifests)} images, not one")
    digest = manifests[0]["digest"]
    blobs = layout / "blobs" / "sha256"
    manifest_bytes = (blobs / digest.split(":", 1)[1]).read_bytes()
    manifest = json.loads(manifest_bytes)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        push_blob(base, name, blobs / descriptor["digest"].split(":", 1)[1], descriptor["digest"])
    status, _ = _request("PUT", f"{base}/v2/{name}/manifests/{tag}", data=manifest_bytes,
                         headers={"Content-Type": manifest["mediaType"]})
    if status != 201:
        raise PushError(name, f"putting the manifest {tag}: HTTP {status}")
    return str(digest)
