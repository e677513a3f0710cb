"""Install Ciliary's CNI plugin on this node (the agent pod's ``install-cni`` init container).

The plugin runs on the host, started by the container runtime, not inside the agent
container, so it needs an interpreter the host can run. The agent image carries a
self-contained, relocatable CPython with only the plugin and its two dependencies
(pydantic, pyroute2) in ``/opt/ciliary-cni`` (built by the Dockerfile's ``cni-runtime``
stage). This script, using only the standard library:

1. copies that runtime to ``<runtime-dir>/cni-<digest>`` on the host (into a temporary
   directory first, renamed into place; an existing copy with the same digest is reused);
2. writes ``<bin-dir>/ciliary-cni``, a two-line shell wrapper exec'ing that runtime
   (written to a temporary file and renamed, so a concurrent ADD never sees half a file);
3. reads this node's ``spec.podCIDR`` from the Node object (``nodes get``: the agent's only
   Kubernetes permission) and writes ``<conf-dir>/<conf-name>`` from the template, replacing
   ``__POD_CIDR__``, again by rename;
4. removes runtime copies other than the new one and the one the old wrapper used.

Configuration comes from the environment (set by the chart): ``CILIARY_NODE_NAME``,
``CILIARY_CNI_BIN_DIR``, ``CILIARY_CNI_CONF_DIR``, ``CILIARY_CNI_CONF_NAME``,
``CILIARY_CNI_RUNTIME_DIR``, ``CILIARY_CNI_RUNTIME_SOURCE`` (default ``/opt/ciliary-cni``),
``CILIARY_CNI_CONF_TEMPLATE``, ``CILIARY_CNI_WAIT_SECONDS`` (how long to wait for the node's
podCIDR, default 120). The API server, token and CA default to the in-cluster service
account and can be overridden with ``CILIARY_API_SERVER``, ``CILIARY_API_TOKEN_FILE``,
``CILIARY_API_CA_FILE`` (the integration tests do).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WRAPPER_MARK = "# installed by ciliary install-cni"


def log(message: str) -> None:
    print(f"install-cni: {message}", file=sys.stderr, flush=True)


def runtime_digest(source: Path) -> str:
    """A digest of every file name and content of the runtime (stable across image rebuilds)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def install_runtime(source: Path, runtime_dir: Path) -> Path:
    target = runtime_dir / f"cni-{runtime_digest(source)}"
    if (target / "python" / "bin" / "python3").exists():
        log(f"runtime {target} already installed")
        return target
    runtime_dir.mkdir(parents=True, exist_ok=True)
    partial = runtime_dir / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, symlinks=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log(f"runtime installed in {target}")
    return target


def write_atomically(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.rename(path)


def wrapper_text(runtime: Path, log_level: str) -> str:
    return (f"#!/bin/sh\n{WRAPPER_MARK}; the plugin runs on the host with its own Python\n"
            f"CILIARY_CNI_LOG_LEVEL=\"${{CILIARY_CNI_LOG_LEVEL:-{log_level}}}\" "
            f"exec {runtime}/python/bin/python3 -I -m ciliary.cni.main \"$@\"\n")


def runtime_of_wrapper(wrapper: Path) -> Path | None:
    """The runtime directory an existing wrapper execs (None when there is no ciliary wrapper)."""
    try:
        text = wrapper.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if WRAPPER_MARK not in text:
        return None
    for word in text.split():
        if word.endswith("/python/bin/python3"):
            return Path(word).parents[2]
    return None


def read_pod_cidr(env: Mapping[str, str], node: str) -> str | None:
    server = env.get("CILIARY_API_SERVER") or (
        f"https://{env['KUBERNETES_SERVICE_HOST']}:{env.get('KUBERNETES_SERVICE_PORT', '443')}")
    token = Path(env.get("CILIARY_API_TOKEN_FILE", str(SA_DIR / "token"))).read_text().strip()
    context = ssl.create_default_context(cafile=env.get("CILIARY_API_CA_FILE", str(SA_DIR / "ca.crt")))
    request = urllib.request.Request(f"{server}/api/v1/nodes/{node}",
                                     headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        body = json.load(response)
    cidrs = [body.get("spec", {}).get("podCIDR"), *body.get("spec", {}).get("podCIDRs", [])]
    for cidr in cidrs:
        if cidr and ipaddress.ip_network(cidr, strict=False).version == 4:
            return str(cidr)
    return None


def wait_pod_cidr(env: Mapping[str, str], node: str) -> str:
    deadline = time.monotonic() + float(env.get("CILIARY_CNI_WAIT_SECONDS", "120"))
    while True:
        try:
            cidr = read_pod_cidr(env, node)
        except urllib.error.HTTPError as exc:
            # 403 means the RBAC is wrong: no point in waiting
            raise SystemExit(f"install-cni: reading node {node} failed: {exc.code} {exc.reason}") from exc
        if cidr:
            return cidr
        if time.monotonic() > deadline:
            raise SystemExit(f"install-cni: node {node} has no IPv4 spec.podCIDR (is the controller manager "
                             "allocating node CIDRs?)")
        log(f"node {node} has no IPv4 podCIDR yet, waiting")
        time.sleep(2)


def main(env: Mapping[str, str] = os.environ) -> int:
    node = env["CILIARY_NODE_NAME"]
    bin_dir = Path(env.get("CILIARY_CNI_BIN_DIR", "/host/opt/cni/bin"))
    conf_dir = Path(env.get("CILIARY_CNI_CONF_DIR", "/host/etc/cni/net.d"))
    conf_name = env.get("CILIARY_CNI_CONF_NAME", "05-ciliary.conflist")
    runtime_dir = Path(env.get("CILIARY_CNI_RUNTIME_DIR", "/host/opt/ciliary"))
    # the path the host sees: the wrapper runs on the host, not in this container
    host_runtime_dir = Path(env.get("CILIARY_CNI_HOST_RUNTIME_DIR", str(runtime_dir)))
    source = Path(env.get("CILIARY_CNI_RUNTIME_SOURCE", "/opt/ciliary-cni"))
    template = Path(env.get("CILIARY_CNI_CONF_TEMPLATE", "/etc/ciliary/cni/conflist.template")).read_text()

    cidr = wait_pod_cidr(env, node)
    wrapper = bin_dir / "ciliary-cni"
    previous = runtime_of_wrapper(wrapper)
    runtime = install_runtime(source, runtime_dir)
    write_atomically(wrapper, wrapper_text(host_runtime_dir / runtime.name, env.get("CILIARY_CNI_LOG_LEVEL", "INFO")),
                     0o755)
    log(f"wrapper written to {wrapper}")
    conflist = template.replace("__POD_CIDR__", cidr)
    json.loads(conflist)  # never write a configuration the runtime cannot parse
    write_atomically(conf_dir / conf_name, conflist, 0o644)
    log(f"network configuration {conf_dir / conf_name} written (podCIDR {cidr})")
    keep = {runtime.name, previous.name if previous else ""}
    for old in runtime_dir.glob("cni-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
            log(f"removed old runtime {old}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
