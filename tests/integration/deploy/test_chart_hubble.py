"""The chart's Hubble parts, judged from ``helm template``: the relay container in every operator pod and
its ``hubble-relay`` Service, the agents' Observer API on the node address, the service-map Deployment
(``ciliary-ui``) and its ``hubble-ui`` Service, and the switches that turn them off.

Arguments and environment are not only compared with strings: the relay's and the UI's arguments go
through their own argument parsers, and the agent's environment (after the kubelet's ``$(VAR)``
expansion) through the agent's settings loader, so a flag the program does not know fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import CHART, NAMESPACE, RELEASE, Helm, documents, find

pytestmark = pytest.mark.integration

NODE_IP = "192.0.2.7"


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion of an env value or argument (VAR defined earlier)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def _field_value(ref: dict[str, Any]) -> str:
    path = ref["valueFrom"]["fieldRef"]["fieldPath"]
    return {"status.hostIP": NODE_IP, "status.podIP": NODE_IP, "spec.nodeName": "node-1",
            "metadata.uid": "uid", "metadata.namespace": NAMESPACE}[path]


def _environment(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        env[item["name"]] = _field_value(item) if "valueFrom" in item else _expand(item["value"], env)
    return env


def test_the_relay_runs_in_every_operator_pod_behind_the_hubble_relay_service(helm: Helm) -> None:
    from ciliary.operator import relay

    docs = documents(helm.template())
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]
    container = _container(operator["spec"], "relay")
    assert container["command"] == ["ciliary-relay"]
    env = _environment(container)
    args = relay.build_parser().parse_args([_expand(a, env) for a in container["args"]])
    assert args.listen == f"{NODE_IP}:4245"
    assert args.etcd_endpoints == f"https://{RELEASE}-ciliary-etcd.{NAMESPACE}.svc:2379"
    assert not args.etcd_insecure
    # its own etcd user (ciliary-relay: node records, read only), never the operator's or root's credentials
    assert env["CILIARY_RELAY_ETCD_CERT_FILE"] == "/etc/ciliary/etcd-relay/tls.crt"
    assert {"name": "etcd-relay", "mountPath": "/etc/ciliary/etcd-relay", "readOnly": True} in container["volumeMounts"]
    assert {m["name"] for m in container["volumeMounts"]} == {"tmp", "etcd-relay", "hubble-tls"}
    assert env["CILIARY_RELAY_HUBBLE_TLS_CERT_FILE"] == "/etc/ciliary/hubble-tls/tls.crt"
    assert env["CILIARY_RELAY_HUBBLE_TLS_SERVER_CA_FILE"] == "/etc/ciliary/hubble-tls/ca.crt"
    assert not args.hubble_insecure
    assert container["readinessProbe"]["grpc"]["port"] == 4245
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["ports"] == [{"name": "hubble-relay", "containerPort": 4245, "protocol": "TCP"}]

    service = find(docs, "Service", "hubble-relay")
    assert service["metadata"]["name"] == "hubble-relay"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 80, "targetPort": "hubble-relay", "protocol": "TCP"}]
    selector = service["spec"]["selector"]
    assert selector.items() <= operator["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/component"] == "operator"


def _with_files(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with each ``*_FILE`` pointing at an (empty) file: the loader checks they exist."""
    out = dict(env)
    for name in [n for n in env if n.endswith("_FILE")]:
        (tmp_path / name).touch()
        out[name] = str(tmp_path / name)
    return out


def test_agents_serve_the_observer_api_on_the_node_address_the_relay_reaches(helm: Helm, tmp_path: Path) -> None:
    from ciliary.nodeagent import settings

    agent = find(documents(helm.template()), "DaemonSet", "-agent")["spec"]["template"]["spec"]
    env = _environment(_container(agent, "agent"))
    assert env["CILIARY_AGENT_HUBBLE_ADDR"] == f"{NODE_IP}:4244"
    assert env["CILIARY_AGENT_FLOW_BUFFER_SIZE"] == "4096"
    loaded = settings.load_settings([], _with_files(env, tmp_path))
    assert loaded.hubble_addr == f"{NODE_IP}:4244"  # also what the node record tells the relay
    assert loaded.flow_buffer_size == 4096
    assert loaded.hubble_tls is not None and not loaded.hubble_insecure, "off loopback: mutual TLS"
    assert loaded.hubble_socket == "/run/ciliary/hubble.sock"

    chosen = find(documents(helm.template(CHART, "agent.hubble.listenAddress=off",
                                          "agent.hubble.flowBufferSize=65536")), "DaemonSet", "-agent")
    env = _environment(_container(chosen["spec"]["template"]["spec"], "agent"))
    loaded = settings.load_settings([], _with_files(env, tmp_path))
    assert loaded.hubble_addr == "" and loaded.flow_buffer_size == 65536


def test_the_service_map_is_a_tokenless_deployment_reading_the_relay_service(helm: Helm) -> None:
    from ciliary.operator import service_map_ui

    docs = documents(helm.template())
    deployment = find(docs, "Deployment", "-ui")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _container(pod, "ui")
    assert container["command"] == ["ciliary-ui"]
    assert "env" not in container and not [v for v in pod["volumes"] if "secret" in v or "projected" in v]
    args = service_map_ui.build_parser().parse_args(container["args"])
    assert args.server == f"hubble-relay.{NAMESPACE}.svc:80"
    assert args.listen == "0.0.0.0:8081" and args.refresh == 2
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    service = find(docs, "Service", "hubble-ui")
    assert service["metadata"]["name"] == "hubble-ui" and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_switches_turn_the_relay_and_the_ui_off(helm: Helm) -> None:
    docs = documents(helm.template(CHART, "relay.enabled=false", "ui.enabled=false"))
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert "relay" not in {c["name"] for c in operator["containers"]}
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] in ("hubble-relay", "hubble-ui")]
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-ui")]
    agent = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert _environment(_container(agent, "agent"))["CILIARY_AGENT_HUBBLE_ADDR"] == "127.0.0.1:4244", \
        "no relay: the Observer API stays node-local"

    refused = helm.run("template", "x", str(CHART), "--set", "relay.enabled=false", check=False)
    assert refused.returncode != 0 and "ui.server" in refused.stderr
    own = documents(helm.template(CHART, "relay.enabled=false", "ui.server=relay.example:4245",
                                  "ui.service.name=flows-ui"))
    ui = _container(find(own, "Deployment", "-ui")["spec"]["template"]["spec"], "ui")
    assert "--server=relay.example:4245" in ui["args"]
    assert find(own, "Service", "flows-ui")["metadata"]["name"] == "flows-ui"


def test_the_relay_follows_external_etcd_settings(helm: Helm) -> None:
    from ciliary.operator import relay

    insecure = documents(helm.template(CHART, "etcd.enabled=false", "etcd.external.endpoints={http://e1:2379}",
                                       "etcd.external.insecure=true"))
    container = _container(find(insecure, "Deployment", "-operator")["spec"]["template"]["spec"], "relay")
    env = _environment(container)
    args = relay.build_parser().parse_args([_expand(a, env) for a in container["args"]])
    assert args.etcd_insecure and args.etcd_endpoints == "http://e1:2379"
    assert "CILIARY_RELAY_ETCD_CERT_FILE" not in env
    assert "etcd-relay" not in {m["name"] for m in container["volumeMounts"]}
    tls = documents(helm.template(CHART, "etcd.enabled=false", "etcd.external.endpoints={https://e1:2379}",
                                  "etcd.external.tls.secretName=etcd-client"))
    container = _container(find(tls, "Deployment", "-operator")["spec"]["template"]["spec"], "relay")
    assert "--etcd-insecure" not in container["args"]
    # an external etcd: the one client Secret the chart is given (etcd.external.tls.secretName), no relay user
    assert _environment(container)["CILIARY_RELAY_ETCD_KEY_FILE"] == "/etc/ciliary/etcd-tls/tls.key"


def test_chart_lints_with_the_hubble_parts_off(helm: Helm) -> None:
    for sets in (("relay.enabled=false", "ui.enabled=false"), ("ui.enabled=false",)):
        args = [a for s in sets for a in ("--set", s)]
        done = helm.run("lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in done.stdout and "[WARNING]" not in done.stdout


def test_the_operator_serves_its_metrics_where_the_value_says(helm: Helm) -> None:
    from ciliary.operator import main

    for sets, wanted in (((), "127.0.0.1:9963"),
                         (("operator.prometheusServeAddr=$(CILIARY_OPERATOR_POD_IP):9963",), f"{NODE_IP}:9963"),
                         (("operator.prometheusServeAddr=off",), "")):
        operator = find(documents(helm.template(CHART, *sets)), "Deployment", "-operator")["spec"]["template"]
        env = _environment(_container(operator["spec"], "operator"))
        assert main._metrics_address(env["CILIARY_OPERATOR_PROMETHEUS_SERVE_ADDR"]) == wanted
