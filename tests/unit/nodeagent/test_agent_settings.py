"""Settings from flags over environment, and the key=value log formatter."""

import logging
import re
from pathlib import Path

import pytest

from ciliary.nodeagent import logs, settings


@pytest.fixture
def tls_env(tmp_path):
    """CILIARY_AGENT_ETCD_*_FILE pointing at three (dummy) files."""
    env = {}
    for name in ("CA", "CERT", "KEY"):
        path = tmp_path / f"{name.lower()}.pem"
        path.write_text("x")
        env[f"CILIARY_AGENT_ETCD_{name}_FILE"] = str(path)
    return env


def test_defaults(tls_env):
    s = settings.load_settings([], {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env})
    assert s.node_name == "n1"
    assert [str(e) for e in s.etcd_endpoints] == ["https://127.0.0.1:2379"]
    assert s.etcd_tls is not None and str(s.etcd_tls.cert_file) == tls_env["CILIARY_AGENT_ETCD_CERT_FILE"]
    assert not s.etcd_insecure
    assert s.socket_path == Path("/run/ciliary/agent.sock")
    assert (s.health_host, s.health_port, s.lease_ttl) == ("127.0.0.1", 9876, 10)
    assert s.hubble_addr == "127.0.0.1:4244" and s.flow_buffer_size == 4096


def test_hubble_addr_flag_env_and_off(tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", "CILIARY_AGENT_HUBBLE_ADDR": "0.0.0.0:5555",
           "CILIARY_AGENT_HUBBLE_INSECURE": "on", **tls_env}
    assert settings.load_settings([], env).hubble_addr == "0.0.0.0:5555"
    assert settings.load_settings(["--hubble-addr", "off"], env).hubble_addr == ""
    assert settings.load_settings(["--flow-buffer-size", "65536"], env).flow_buffer_size == 65536
    with pytest.raises(SystemExit):
        settings.load_settings(["--flow-buffer-size", "8"], env)
    with pytest.raises(SystemExit) as info:
        settings.load_settings(["--hubble-addr", "nowhere"], env)
    assert info.value.code == 2


def _hubble_files(tmp_path):
    paths = {}
    for name in ("cert", "key", "client-ca"):
        paths[name] = tmp_path / f"hubble-{name}.pem"
        paths[name].write_text("x")
    return ["--hubble-tls-cert-file", str(paths["cert"]), "--hubble-tls-key-file", str(paths["key"]),
            "--hubble-tls-client-ca-file", str(paths["client-ca"])]


def test_a_non_loopback_observer_api_needs_mutual_tls_or_the_insecure_flag(tls_env, tmp_path, capsys):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    with pytest.raises(SystemExit) as info:
        settings.load_settings(["--hubble-addr", "192.0.2.7:4244"], env)
    assert info.value.code == 2 and "--hubble-insecure" in capsys.readouterr().err
    plain = settings.load_settings(["--hubble-addr", "192.0.2.7:4244", "--hubble-insecure"], env)
    assert plain.hubble_insecure and plain.hubble_tls is None
    secured = settings.load_settings(["--hubble-addr", "192.0.2.7:4244", *_hubble_files(tmp_path)], env)
    assert secured.hubble_tls is not None and not secured.hubble_insecure
    assert secured.hubble_tls.client_ca_file == tmp_path / "hubble-client-ca.pem"
    for local in ("127.0.0.1:4244", "[::1]:4244", "localhost:4244"):
        assert settings.load_settings(["--hubble-addr", local], env).hubble_tls is None
    socket = settings.load_settings(["--hubble-socket", "/run/ciliary/hubble.sock"], env)
    assert socket.hubble_socket == "/run/ciliary/hubble.sock"


def test_hubble_tls_files_come_all_three_and_exist(tls_env, tmp_path, capsys):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    files = _hubble_files(tmp_path)
    with pytest.raises(SystemExit):
        settings.load_settings(files[:4], env)
    assert "CA file is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings.load_settings([*files[:5], str(tmp_path / "absent.pem")], env)
    assert "no such file" in capsys.readouterr().err


def test_env_then_flags(tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "env-node", "CILIARY_AGENT_ETCD_ENDPOINTS": "https://10.0.0.1:2379,10.0.0.2",
           "CILIARY_AGENT_SOCKET": "/tmp/a.sock", "CILIARY_AGENT_STATE_DIR": "/tmp/st",
           "CILIARY_AGENT_HEALTH_ADDR": "0.0.0.0:1234", "CILIARY_AGENT_LEASE_TTL": "30", **tls_env}
    s = settings.load_settings([], env)
    assert [str(e) for e in s.etcd_endpoints] == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert (s.node_name, s.lease_ttl, s.health_addr) == ("env-node", 30, "0.0.0.0:1234")
    s = settings.load_settings(["--node", "flag-node", "--lease-ttl", "6", "--health-addr", "127.0.0.1:1"], env)
    assert (s.node_name, s.lease_ttl, s.health_port) == ("flag-node", 6, 1)


@pytest.mark.parametrize("argv", [["--lease-ttl", "1"], ["--etcd-endpoints", "ftp://x:1"], ["--health-addr", "x"],
                                  ["--node", "a/b"]])
def test_invalid_values_exit_2(argv, tls_env):
    with pytest.raises(SystemExit) as caught:
        settings.load_settings(argv, {"CILIARY_AGENT_NODE_NAME": "n", **tls_env})
    assert caught.value.code == 2


def test_https_without_client_certificate_is_refused(capsys, tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "n", **tls_env}
    del env["CILIARY_AGENT_ETCD_KEY_FILE"]
    with pytest.raises(SystemExit) as caught:
        settings.load_settings([], env)
    assert caught.value.code == 2
    assert "--etcd-key-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings.load_settings(["--etcd-ca-file", "/nonexistent/ca.crt"], {"CILIARY_AGENT_NODE_NAME": "n", **tls_env})
    assert "not found: --etcd-ca-file /nonexistent/ca.crt" in capsys.readouterr().err


def test_plain_http_only_with_etcd_insecure(capsys):
    env = {"CILIARY_AGENT_NODE_NAME": "n", "CILIARY_AGENT_ETCD_ENDPOINTS": "http://10.0.0.1:2379"}
    with pytest.raises(SystemExit) as caught:
        settings.load_settings([], env)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "plain-HTTP etcd endpoint(s) http://10.0.0.1:2379 refused" in err and "--etcd-insecure" in err
    s = settings.load_settings(["--etcd-insecure"], env)
    assert s.etcd_insecure and s.etcd_tls is None and not s.etcd_endpoints[0].secure
    assert settings.load_settings([], {**env, "CILIARY_AGENT_ETCD_INSECURE": "on"}).etcd_insecure


def test_help_mentions_env_vars(capsys):
    with pytest.raises(SystemExit):
        settings.load_settings(["--help"], {})
    out = capsys.readouterr().out
    for name in ("CILIARY_AGENT_NODE_NAME", "CILIARY_AGENT_ETCD_ENDPOINTS", "CILIARY_AGENT_LEASE_TTL", "--state-dir"):
        assert name in out


def test_key_value_formatter():
    record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "Node registered",
                                    "node": "n1", "lease": 5, "path": "/a b"})
    line = logs.KeyValueFormatter().format(record)
    assert 'msg="Node registered"' in line
    assert "node=n1 lease=5" in line
    assert 'path="/a b"' in line
    assert re.match(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} level=INFO", line)  # to the millisecond


def test_datapath_is_on_by_default_and_auto_is_gone(tls_env):
    node = {"CILIARY_AGENT_NODE_NAME": "n", **tls_env}
    assert settings.load_settings([], node).datapath is True
    assert settings.load_settings(["--netns", ""], node).datapath is True
    assert settings.load_settings(["--datapath", "off"], node).datapath is False
    assert settings.load_settings([], {**node, "CILIARY_AGENT_DATAPATH": "off"}).datapath is False
    for spelled in (["--datapath", "auto"], ["--datapath", "maybe"]):
        with pytest.raises(SystemExit) as caught:
            settings.load_settings(spelled, node)
        assert caught.value.code == 2
    with pytest.raises(SystemExit):
        settings.load_settings([], {**node, "CILIARY_AGENT_DATAPATH": "auto"})


def test_every_switch_from_the_environment_is_checked(tls_env, capsys):
    """An environment value escapes argparse's choices: ``CILIARY_AGENT_DIRECT_STATUS=true`` (what the chart
    once set) used to turn direct status off silently. Now on/off switches read boolean words, log levels
    any case, and a value a switch does not know stops the agent naming the variable."""
    node = {"CILIARY_AGENT_NODE_NAME": "n", **tls_env}
    for word, on in (("on", True), ("true", True), ("Yes", True), ("1", True), ("off", False), ("false", False)):
        assert settings.load_settings([], {**node, "CILIARY_AGENT_DIRECT_STATUS": word}).direct_status is on
    assert settings.load_settings([], node).direct_status is False
    assert settings.load_settings(["--l7-proxy", "false"], node).l7_proxy is False
    for level, expected in (("warn", "WARN"), ("Info", "INFO"), ("CRITICAL", "CRITICAL")):
        assert settings.load_settings([], {**node, "CILIARY_AGENT_LOG_LEVEL": level}).log_level == expected
    for env, value in (("DIRECT_STATUS", "maybe"), ("L7_PROXY", "enabled"), ("MONITOR_AGGREGATION", "true"),
                       ("LOG_LEVEL", "loud")):
        with pytest.raises(SystemExit) as caught:
            settings.load_settings([], {**node, f"CILIARY_AGENT_{env}": value})
        assert caught.value.code == 2
        assert f"CILIARY_AGENT_{env} must be one of" in capsys.readouterr().err


def test_socket_load_balancing_is_off_unless_a_cgroup_is_given(tls_env):
    assert settings.load_settings([], {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}).lb_cgroup is None
    env = {"CILIARY_AGENT_NODE_NAME": "n1", "CILIARY_AGENT_LB_CGROUP": "/sys/fs/cgroup/x", **tls_env}
    assert settings.load_settings([], env).lb_cgroup == Path("/sys/fs/cgroup/x")
    assert settings.load_settings(["--lb-cgroup", "/cg/y"], env).lb_cgroup == Path("/cg/y")


def test_kube_proxys_ports_default_flag_env_and_off(tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    s = settings.load_settings([], env)
    assert (s.proxy_healthz_addr, s.proxy_status_addr) == ("0.0.0.0:10256", "127.0.0.1:10249")
    s = settings.load_settings(["--proxy-status-addr", "off"], {**env, "CILIARY_AGENT_PROXY_HEALTHZ_ADDR": "off"})
    assert (s.proxy_healthz_addr, s.proxy_status_addr) == ("", "")
    assert settings.load_settings([], {**env, "CILIARY_AGENT_PROXY_STATUS_ADDR": "0.0.0.0:20249"}
                                  ).proxy_status_addr == "0.0.0.0:20249"
    with pytest.raises(SystemExit):
        settings.load_settings(["--proxy-status-addr", "10249"], env)


def test_dns_proxy_flags(tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    s = settings.load_settings([], env)
    assert (s.dns_proxy_port, s.fqdn_min_ttl, s.fqdn_max_ips_per_endpoint) == (10053, 3600, 1000)
    s = settings.load_settings(["--dns-proxy-port", "0", "--fqdn-min-ttl", "1"],
                               {**env, "CILIARY_AGENT_FQDN_MAX_IPS_PER_ENDPOINT": "5"})
    assert (s.dns_proxy_port, s.fqdn_min_ttl, s.fqdn_max_ips_per_endpoint) == (0, 1, 5)
    with pytest.raises(SystemExit):
        settings.load_settings(["--dns-proxy-port", "70000"], env)
    with pytest.raises(SystemExit):
        settings.load_settings(["--fqdn-max-ips-per-endpoint", "0"], env)


def test_monitor_aggregation_default_env_flag_and_bad_value(tls_env, capsys):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    assert settings.load_settings([], env).monitor_aggregation == "medium"
    assert settings.load_settings([], {**env, "CILIARY_AGENT_MONITOR_AGGREGATION": "none"}).monitor_aggregation == "none"
    assert settings.load_settings(["--monitor-aggregation", "maximum"], env).monitor_aggregation == "maximum"
    assert settings.load_settings([], env).monitor_aggregation_interval == 5
    assert settings.load_settings([], {**env, "CILIARY_AGENT_MONITOR_AGGREGATION_INTERVAL": "0"}
                                  ).monitor_aggregation_interval == 0
    assert settings.load_settings(["--monitor-aggregation-interval", "30"], env).monitor_aggregation_interval == 30
    with pytest.raises(SystemExit) as info:
        settings.load_settings(["--monitor-aggregation", "low"], env)
    assert info.value.code == 2 and "--monitor-aggregation" in capsys.readouterr().err


def test_pod_netns_dir_flag_and_env(tls_env):
    env = {"CILIARY_AGENT_NODE_NAME": "n1", **tls_env}
    assert settings.load_settings([], env).pod_netns_dir is None  # each pod's CNI path
    assert settings.load_settings([], {**env, "CILIARY_AGENT_POD_NETNS_DIR": "/host/netns"}).pod_netns_dir == \
        Path("/host/netns")
    assert settings.load_settings(["--pod-netns-dir", " "], env).pod_netns_dir is None
