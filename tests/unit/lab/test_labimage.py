"""``image: lab`` manifests made real pods for the real-node lab (ciliary.lab.labimage)."""

from __future__ import annotations

import pytest
import yaml

from ciliary.lab import labimage
from ciliary.lab.images import APP_IMAGE

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node-1
  containers:
  - {name: c, image: lab, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}, {containerPort: 8080, name: web}]}
  - {name: side, image: docker.io/library/other:1}
---
apiVersion: v1
kind: Pod
metadata: {name: b}
spec: {containers: [{name: c, image: lab}], terminationGracePeriodSeconds: 5}
"""


def test_lab_containers_become_the_app_image_serving_their_declared_ports() -> None:
    ns, a, b = list(yaml.safe_load_all(labimage.manifest_for_real_nodes(MANIFEST)))
    assert ns == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    served, side = a["spec"]["containers"]
    assert served["image"] == APP_IMAGE and served["imagePullPolicy"] == "Never"
    assert served["args"] == ["--name", "x/a", "--tcp", "80", "--udp", "53", "--tcp", "8080"]
    assert served["ports"][2] == {"containerPort": 8080, "name": "web"}  # declared ports stay declared
    assert side == {"name": "side", "image": "docker.io/library/other:1"}
    assert a["spec"]["nodeName"] == "node-1" and a["spec"]["terminationGracePeriodSeconds"] == 1
    assert b["spec"]["containers"][0]["args"] == ["--name", "default/b"]
    assert b["spec"]["terminationGracePeriodSeconds"] == 5


def test_manifests_without_the_lab_image_pass_unchanged_and_lists_are_walked() -> None:
    plain = "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n"
    assert labimage.manifest_for_real_nodes(plain) == plain
    listed = {"apiVersion": "v1", "kind": "List", "items": [
        {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "lab"}]}}]}
    out = labimage.for_real_nodes(listed)
    assert out["items"][0]["spec"]["containers"][0]["image"] == APP_IMAGE


def test_a_protocol_the_lab_image_cannot_serve_is_refused() -> None:
    with pytest.raises(ValueError, match="SCTP"):
        labimage.podserver_args("x", "a", [{"containerPort": 9, "protocol": "SCTP"}])


def test_values_kubectl_would_read_as_booleans_stay_strings() -> None:
    text = "kind: Namespace\nmetadata: {name: y, labels: {ns: 'y', x: 'no'}}\n---\n" \
           "kind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, image: lab}]}\n"
    out = labimage.manifest_for_real_nodes(text)
    assert '"ns": "y"' in out and '"x": "no"' in out
