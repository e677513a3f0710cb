"""The handle e2e tests drive a lab with: kubectl, pods, probes, the ciliary CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import topology
from ciliary.lab.lab import Lab
from ciliary.operator.store import access


@dataclass
class LabHandle:
    lab: Lab

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.kubectl(*args, input=input, check=check)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)

    def wait_running(self, name: str, namespace: str = "default", seconds: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.pod(name, namespace)
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in pod.get("status", {}).get("conditions", []))
            if pod.get("status", {}).get("phase") == "Running" and ready and pod["status"].get("podIP"):
                return pod
            time.sleep(0.5)
        events = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                              f"involvedObject.name={name}", check=False).stdout
        pytest.fail(f"pod {namespace}/{name} not Running after {seconds} s: {pod.get('status')}\n{events}")

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        out = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                           f"involvedObject.name={name}", "-o", "json")
        return list(json.loads(out.stdout)["items"])

    def probe(self, kind: str, ip: str, port: int = 0, *, pod: str | None = None, namespace: str = "default",
              world: bool = False, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
        """Run ``ciliary.lab.probe`` inside a pod (or on the world host); returncode 0 = answered."""
        netns: Path  # a path: pod_target gives the pod's namespace file (a containerd pod's is not in /run/netns)
        if world:
            netns = topology.NETNS_DIR / self.lab.layout.world_netns
        else:
            assert pod is not None
            netns, _ = self.lab.pod_target(pod, namespace)
        argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", kind, ip]
        if port:
            argv.append(str(port))
        return subprocess.run([*argv, "--timeout", str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 30)

    def ciliary(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ciliary.cli.main", *args], capture_output=True, text=True,
                              timeout=300, env=self.env())

    def env(self) -> dict[str, str]:
        """This lab's environment: never an etcd or kubeconfig the calling shell points at."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ETCDCTL_", "CILIARY_ETCD_")) and k != "KUBECONFIG"}
        tls = self.lab.etcd_certs().client(access.OPERATOR_USER)
        return {**env, "CILIARY_LAB_DIR": str(self.lab.layout.state_dir),
                "CILIARY_LAB_PREFIX": self.lab.layout.prefix,
                "CILIARY_ETCD_ENDPOINTS": self.lab.ports().etcd_endpoint,
                "CILIARY_ETCD_CA_FILE": str(tls.ca_file), "CILIARY_ETCD_CERT_FILE": str(tls.cert_file),
                "CILIARY_ETCD_KEY_FILE": str(tls.key_file)}
