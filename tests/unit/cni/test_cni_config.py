"""Network configuration parsing, CNI_ARGS / env parsing and the error/version JSON of ``run``."""

import json
from pathlib import Path

import pytest

from ciliary.cni import config, errors, invocation
from ciliary.cni import main as cni_main

GOOD = {
    "cniVersion": "1.0.0", "name": "ciliary", "type": "ciliary-cni", "mtu": 1400,
    "ipam": {"type": "host-local-ciliary", "subnet": "10.244.1.0/24", "dataDir": "/tmp/x"},
    "agentSocket": "/run/ciliary/agent.sock",
}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def test_parses_the_documented_shape():
    conf = config.parse_network_config(raw(GOOD))
    assert conf.mtu == 1400
    assert str(conf.ipam.subnet) == "10.244.1.0/24"
    assert conf.data_dir == Path("/tmp/x")
    assert conf.agent_socket == Path("/run/ciliary/agent.sock")


def test_defaults_and_unknown_fields_are_ignored():
    doc = {k: v for k, v in GOOD.items() if k not in ("mtu", "agentSocket")}
    doc["ipam"] = {"type": "host-local-ciliary", "subnet": "10.244.1.0/24"}
    doc["runtimeConfig"] = {"portMappings": []}
    doc["prevResult"] = {"ips": []}
    conf = config.parse_network_config(raw(doc))
    assert conf.mtu == 1500
    assert conf.data_dir == Path("/var/lib/cni/networks/ciliary")
    assert conf.agent_socket == config.DEFAULT_AGENT_SOCKET
    assert conf.prev_result == {"ips": []}


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda d: d.update(cniVersion="9.9.9"), 1),
        (lambda d: d.pop("cniVersion"), 1),
        (lambda d: d["ipam"].update(subnet="10.244.1.7/24"), 7),
        (lambda d: d["ipam"].update(subnet="10.244.1.0/31"), 7),
        (lambda d: d["ipam"].update(type="host-local"), 7),
        (lambda d: d.update(mtu=10), 7),
        (lambda d: d.pop("ipam"), 7),
    ],
)
def test_invalid_configs_get_the_spec_codes(mutate, code):
    doc = json.loads(json.dumps(GOOD))
    mutate(doc)
    with pytest.raises(errors.CniError) as caught:
        config.parse_network_config(raw(doc))
    assert caught.value.code == code


def test_not_json_is_decoding_failure():
    with pytest.raises(errors.CniError) as caught:
        config.parse_network_config(b"{nope")
    assert caught.value.code == errors.ErrorCode.DECODING_FAILURE == 6


def test_kubelet_cni_args():
    parsed = invocation.parse_cni_args(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
    )
    assert parsed == {
        "IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0",
        "K8S_POD_INFRA_CONTAINER_ID": "abc", "K8S_POD_UID": "u-1",
    }
    assert invocation.parse_cni_args("") == {}
    assert invocation.parse_cni_args("A=1;;B=") == {"A": "1", "B": ""}


def test_malformed_cni_args_is_code_4():
    with pytest.raises(errors.CniError) as caught:
        invocation.parse_cni_args("K8S_POD_NAME")
    assert caught.value.code == errors.ErrorCode.INVALID_ENVIRONMENT == 4


ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/p", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/opt/cni/bin:/usr/lib/cni", "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u"}


def test_read_invocation():
    inv = invocation.read_invocation(ENV)
    assert (inv.command, inv.container_id, inv.netns, inv.ifname) == ("ADD", "c1", "/run/netns/p", "eth0")
    assert inv.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert (inv.pod_namespace, inv.pod_name, inv.pod_uid) == ("ns", "p", "u")


def test_del_tolerates_missing_netns():
    env = {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}
    assert invocation.read_invocation(env).netns == ""


@pytest.mark.parametrize("env", [
    {**ENV, "CNI_COMMAND": "FROB"},
    {k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"},
    {k: v for k, v in ENV.items() if k != "CNI_NETNS"},
    {**ENV, "CNI_IFNAME": "x" * 16},
])
def test_bad_environment_is_code_4_naming_the_variable(env):
    with pytest.raises(errors.CniError) as caught:
        invocation.read_invocation(env)
    assert caught.value.code == 4
    assert "CNI_" in caught.value.msg


def run(env, stdin):
    code, doc = cni_main.run(env, stdin)
    assert doc is not None
    return code, doc


def test_run_error_json_shape():
    code, doc = run({"CNI_COMMAND": "ADD"}, raw(GOOD))
    assert code == 1
    assert set(doc) == {"cniVersion", "code", "msg", "details"}
    assert doc["code"] == 4
    assert doc["cniVersion"] == "1.0.0"


def test_run_error_json_echoes_requested_version():
    env = {**ENV, "CNI_COMMAND": "DEL"}
    code, doc = run(env, raw({**GOOD, "cniVersion": "0.4.0", "ipam": {"type": "nope"}}))
    assert (code, doc["code"], doc["cniVersion"]) == (1, 7, "0.4.0")


def test_run_version():
    code, doc = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert code == 0
    assert doc == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    assert run({"CNI_COMMAND": "VERSION"}, b"")[1]["cniVersion"] == "1.0.0"
