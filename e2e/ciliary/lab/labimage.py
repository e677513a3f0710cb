"""``image: lab`` in the tests' manifests: a container that serves every port it declares, on real kubelets.

A test manifest's ``image: lab`` container means "serve every declared containerPort" (TCP ports answer
HTTP naming the pod, UDP ports echo; ``ciliary.lab.podserver``). That is the image
``docker.io/lab/app:latest`` (``ciliary.lab.images``), whose entrypoint is the podserver: each such
container is made to name that image, is never pulled (the lab imports it into every node) and gets its
ports as arguments. Everything else in the manifest, and every other document, is left as it is.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from ciliary.lab.images import APP_IMAGE

#: the short image name the tests' manifests use
SHORT_IMAGE = "lab"


def podserver_args(namespace: str, pod: str, ports: list[dict[str, Any]]) -> list[str]:
    """``--name NS/POD`` and one ``--tcp N`` / ``--udp N`` per declared port: what the podserver serves."""
    args = ["--name", f"{namespace}/{pod}"]
    for port in ports:
        proto = str(port.get("protocol") or "TCP").upper()
        if proto not in ("TCP", "UDP"):
            raise ValueError(f"pod {namespace}/{pod}: the lab image serves TCP and UDP, not {proto}")
        args += [f"--{proto.lower()}", str(int(port["containerPort"]))]
    return args


def for_real_nodes(doc: dict[str, Any]) -> dict[str, Any]:
    """One manifest document with every ``image: lab`` container made a real lab app container."""
    if doc.get("kind") == "List":
        return {**doc, "items": [for_real_nodes(item) for item in doc.get("items", [])]}
    if doc.get("kind") != "Pod":
        return doc
    meta, spec = doc.get("metadata", {}), dict(doc.get("spec", {}))
    containers = []
    for container in spec.get("containers", []):
        if container.get("image") == SHORT_IMAGE:
            container = {**container, "image": APP_IMAGE, "imagePullPolicy": "Never",
                         "args": podserver_args(meta.get("namespace", "default"), meta["name"],
                                                container.get("ports", []))}
        containers.append(container)
    spec["containers"] = containers
    spec.setdefault("terminationGracePeriodSeconds", 1)  # the podserver stops its servers at once
    return {**doc, "spec": spec}


def manifest_for_real_nodes(text: str) -> str:
    """A multi-document YAML manifest with every ``image: lab`` container made a real lab app container."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if not any(SHORT_IMAGE in str(d) for d in docs):
        return text
    # as JSON documents: kubectl reads YAML 1.1, where a plain ``y`` written back by a YAML 1.2-minded dumper
    # would become a boolean
    return "---\n".join(json.dumps(for_real_nodes(d)) + "\n" for d in docs)
