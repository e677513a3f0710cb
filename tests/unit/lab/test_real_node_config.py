"""Pure parts of real lab nodes: config rendering, host detection, CONNECT parsing, mounts, versions."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from ciliary.lab import images, kubeletnode, nodebins, nodeconfig, nodegateway, nodehost, tools
from ciliary.lab.layout import LabLayout
from ciliary.lab.nodeconfig import Host

HOST = Host(cgroup_driver="cgroupfs", cgroup_v1=True, restrict_oom_score_adj=True)
LAYOUT = LabLayout(state_dir=Path("/lab"), prefix="t1")
PATHS = kubeletnode.node_paths(LAYOUT, "node-1")

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
STATUS_WITHOUT_SYS_RESOURCE = "Name:\tx\nCapEff:\t000001fffeffffff\n"  # bit 24 clear
STATUS_WITH_ALL = "Name:\tx\nCapEff:\t000001ffffffffff\n"


def test_containerd_config_is_valid_toml_with_per_node_paths() -> None:
    doc = tomllib.loads(nodeconfig.render_toml(nodeconfig.containerd_config(PATHS, HOST)))
    assert doc["version"] == 3
    assert doc["root"] == "/lab/nodes/node-1/containerd"
    assert doc["state"] == "/run/ciliary-nodes/t1/node-1/containerd"
    assert doc["grpc"]["address"] == "/run/ciliary-nodes/t1/node-1/containerd.sock"
    runtime = doc["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    assert runtime["containerd"]["runtimes"]["runc"]["options"] == {
        "Root": "/run/ciliary-nodes/t1/node-1/runc", "SystemdCgroup": False}
    assert runtime["cni"]["bin_dirs"] == ["/lab/nodes/node-1/cni/bin"]
    assert runtime["cni"]["conf_dir"] == "/lab/nodes/node-1/cni/net.d"
    assert doc["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == nodeconfig.SANDBOX_IMAGE
    assert doc["plugins"]["io.containerd.nri.v1.nri"]["disable"] is True


def test_containerd_follows_the_detected_host() -> None:
    host = Host(cgroup_driver="systemd", cgroup_v1=False, restrict_oom_score_adj=False)
    doc = tomllib.loads(nodeconfig.render_toml(nodeconfig.containerd_config(PATHS, host)))
    runtime = doc["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is False
    assert runtime["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True


def test_render_toml_quotes_dotted_keys_and_escapes_strings() -> None:
    doc = {"a": {"b.c": {"s": 'x"y', "l": [1, "z"], "t": True, "k:1": 2}, "http://h:1": {"x": 1}}}
    text = nodeconfig.render_toml(doc)
    assert "[a.'b.c']" in text and "[a.'http://h:1']" in text
    assert tomllib.loads(text) == doc


def test_kubelet_config_has_per_node_roots_and_host_settings() -> None:
    cfg = nodeconfig.kubelet_config(PATHS, HOST, client_ca=Path("/lab/pki/ca.crt"))
    assert yaml.safe_load(nodeconfig.dump_yaml(cfg)) == cfg
    assert cfg["cgroupDriver"] == "cgroupfs" and cfg["failCgroupV1"] is False
    assert cfg["cgroupRoot"] == "/ciliary-t1-node-1"
    assert cfg["containerRuntimeEndpoint"] == "unix:///run/ciliary-nodes/t1/node-1/containerd.sock"
    assert cfg["podLogsDir"] == "/lab/nodes/node-1/pod-logs"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authentication"]["x509"]["clientCAFile"] == "/lab/pki/ca.crt"
    argv = nodeconfig.kubelet_argv(Path("/bin/kubelet"), PATHS, "192.0.2.11")
    assert "--root-dir=/lab/nodes/node-1/kubelet" in argv and "--cert-dir=/lab/nodes/node-1/kubelet-pki" in argv
    assert "--hostname-override=node-1" in argv and "--node-ip=192.0.2.11" in argv


def test_cni_conflist_points_at_ciliary_cni_with_the_node_cidr_and_agent() -> None:
    conf = nodeconfig.cni_conflist(PATHS, "10.244.1.0/24", Path("/run/ciliary/t1/node-1/agent.sock"))
    (plugin,) = conf["plugins"]
    assert plugin["type"] == "ciliary-cni"
    assert plugin["ipam"] == {"type": "host-local-ciliary", "subnet": "10.244.1.0/24",
                              "dataDir": "/lab/nodes/node-1/cni/ipam"}
    assert plugin["agentSocket"] == "/run/ciliary/t1/node-1/agent.sock"


def test_egress_selector_sends_cluster_traffic_over_the_unix_socket() -> None:
    cfg = nodeconfig.egress_selector_config(Path("/run/ciliary/t1/egress.sock"))
    (selection,) = cfg["egressSelections"]
    assert selection["name"] == "cluster"
    assert selection["connection"] == {"proxyProtocol": "HTTPConnect",
                                       "transport": {"uds": {"udsName": "/run/ciliary/t1/egress.sock"}}}


def test_detects_a_hybrid_cgroup_layout_without_systemd_or_sys_resource() -> None:
    layout = nodehost.parse_cgroup_mounts(HYBRID_MOUNTS)
    assert layout.kind == "hybrid" and layout.unified == Path("/sys/fs/cgroup/unified")
    assert layout.v1["cpuset"] == Path("/sys/fs/cgroup/cpuset")
    assert layout.v1["name=systemd"] == Path("/sys/fs/cgroup/systemd")
    assert Path("/sys/fs/cgroup/unified") in layout.hierarchies()
    host = nodehost.detect_host(mounts=HYBRID_MOUNTS, status=STATUS_WITHOUT_SYS_RESOURCE, pid1="init\n")
    assert host == Host(cgroup_driver="cgroupfs", cgroup_v1=True, restrict_oom_score_adj=True)


def test_detects_a_pure_v2_systemd_host_with_sys_resource() -> None:
    layout = nodehost.parse_cgroup_mounts(V2_MOUNTS)
    assert layout.kind == "v2" and layout.hierarchies() == [Path("/sys/fs/cgroup")]
    host = nodehost.detect_host(mounts=V2_MOUNTS, status=STATUS_WITH_ALL, pid1="systemd\n")
    assert host == Host(cgroup_driver="systemd", cgroup_v1=False, restrict_oom_score_adj=False)


@pytest.mark.parametrize(("head", "target"), [
    (b"CONNECT 192.0.2.11:10250 HTTP/1.1\r\nHost: 192.0.2.11:10250\r\n\r\n", ("192.0.2.11", 10250)),
    (b"CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n", ("fd00::1", 443)),
])
def test_parse_connect(head: bytes, target: tuple[str, int]) -> None:
    assert nodegateway.parse_connect(head) == target


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\r\n\r\n", b"CONNECT host HTTP/1.1\r\n\r\n",
                                  b"CONNECT a:99999 HTTP/1.1\r\n\r\n", b"CONNECT a:1 SPDY\r\n\r\n"])
def test_parse_connect_refuses(head: bytes) -> None:
    with pytest.raises(ValueError):
        nodegateway.parse_connect(head)


def test_gateway_node_flag_round_trips() -> None:
    node = nodegateway.GatewayNode("node-1", "t1-node-1", "192.0.2.11")
    assert nodegateway.GatewayNode.parse(node.flag()) == node
    with_pods = nodegateway.GatewayNode("node-1", "t1-node-1", "192.0.2.11", "10.244.1.0/24")
    assert nodegateway.GatewayNode.parse(with_pods.flag()) == with_pods


def test_gateway_dials_a_node_or_its_pods_from_that_node_and_nothing_else() -> None:
    # the apiserver's pods/proxy (upstream DNS and Services specs read pods through it) CONNECTs to pod IPs
    node = nodegateway.GatewayNode("node-1", "t1-node-1", "192.0.2.11", "10.244.1.0/24")
    assert node.owns("192.0.2.11") and node.owns("10.244.1.7")
    assert not node.owns("10.244.2.7") and not node.owns("192.0.2.12") and not node.owns("127.0.0.1")
    assert not node.owns("not-an-address")
    assert not nodegateway.GatewayNode("node-1", "t1-node-1", "192.0.2.11").owns("10.244.1.7")


def test_mounts_under_finds_only_mounts_below_the_roots_deepest_first() -> None:
    mountinfo = "\n".join([
        "22 1 0:21 / /run rw - tmpfs tmpfs rw",
        "30 22 0:40 / /run/ciliary-nodes/t1/node-1/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay o rw",
        "31 22 0:41 / /run/ciliary-nodes/t1/node-1/containerd/netns/cni-1 rw - nsfs nsfs rw",
        "32 1 0:42 / /lab/nodes/node-1/kubelet/pods/u/volumes/x rw - tmpfs tmpfs rw",
        "33 1 0:43 / /lab/nodes/node-10 rw - tmpfs tmpfs rw",
    ])
    found = kubeletnode.mounts_under([PATHS.run, PATHS.state], mountinfo)
    assert Path("/lab/nodes/node-10") not in found and Path("/run") not in found
    assert len(found) == 3
    assert found[0] == Path("/run/ciliary-nodes/t1/node-1/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs")


def test_node_binary_paths_follow_the_pinned_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = {"KUBERNETES_VERSION": "v9.8.7", "CONTAINERD_VERSION": "v8.7.6", "REGISTRY_VERSION": "v7.6.5",
              "SKAFFOLD_VERSION": "v6.5.4", "COREDNS_VERSION": "v5.4.3"}
    monkeypatch.setenv("CILIARY_CACHE", str(tmp_path))
    bins = nodebins.NodeBinaries.discover(pinned)
    assert bins.containerd == tmp_path / "bin" / "containerd-v8.7.6" / "containerd"
    assert bins.kubelet == tmp_path / "bin" / "kubernetes-node-v9.8.7" / "kubelet"
    assert bins.registry == tmp_path / "bin" / "registry-v7.6.5" / "registry"
    assert bins.coredns == tmp_path / "bin" / "coredns-v5.4.3" / "coredns"
    assert bins.containerd in bins.missing()
    with pytest.raises(nodebins.NodeBinariesMissingError):
        bins.require()


def test_the_repository_pins_every_real_node_version() -> None:
    pinned = tools.pinned_versions()
    for key in ("KUBERNETES_VERSION", "CONTAINERD_VERSION", "REGISTRY_VERSION", "SKAFFOLD_VERSION"):
        assert pinned.get(key), key
    for tool in tools.NODE_TOOLS:
        assert tools.setup_step(tool).startswith("setup/build-node-tools.sh")


def test_the_debian_suite_is_the_hosts() -> None:
    assert images.parse_codename('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n') \
        == "bookworm"
    assert images.parse_codename("ID=debian\n") is None



def test_shim_socket_names_follow_containerd_naming() -> None:
    import hashlib

    names = kubeletnode.shim_socket_names(Path("/run/ciliary/t1/node-1/containerd.sock"), "k8s.io", ["abc"])
    assert names == [hashlib.sha256(b"/run/ciliary/t1/node-1/containerd.sock/k8s.io/abc").hexdigest(),
                     hashlib.sha256(b"/run/ciliary/t1/node-1/containerd.sock/k8s.io/abc/debug").hexdigest()]


def test_registry_hosts_tell_containerd_to_use_plain_http_for_the_lab_registry() -> None:
    host, text = nodeconfig.registry_hosts(5123)
    assert host == "localhost:5123"
    doc = tomllib.loads(text)
    assert doc["server"] == "http://localhost:5123"
    assert doc["host"]["http://localhost:5123"]["capabilities"] == ["pull", "resolve", "push"]
    containerd = tomllib.loads(nodeconfig.render_toml(nodeconfig.containerd_config(PATHS, HOST)))
    assert containerd["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == \
        "/lab/nodes/node-1/registry-hosts"


def test_registry_config_listens_on_loopback_only() -> None:
    cfg = nodeconfig.registry_config(Path("/lab/registry"), 5123)
    assert cfg["http"]["addr"] == "127.0.0.1:5123"
    assert cfg["storage"]["filesystem"]["rootdirectory"] == "/lab/registry"


def test_chart_mode_node_mounts_its_own_host_directories_in_a_private_namespace() -> None:
    script = nodeconfig.private_mounts_script(PATHS)
    lines = script.splitlines()
    assert lines[0] == "set -e" and lines[-1] == 'exec "$@"'
    for host_dir, slug in (("/etc", "etc"), ("/opt", "opt"), ("/var/lib", "var-lib")):
        assert (f"mount -t overlay overlay -o lowerdir={host_dir},upperdir=/lab/nodes/node-1/host/{slug}/upper,"
                f"workdir=/lab/nodes/node-1/host/{slug}/work {host_dir}") in lines
    # the binds come after the overlays they sit on, bpffs is the node's own and shared (Bidirectional)
    assert lines.index("mount --bind /lab/nodes/node-1/cni/bin /opt/cni/bin") > max(
        i for i, line in enumerate(lines) if "overlay" in line)
    assert "mount --bind /lab/nodes/node-1/cni/net.d /etc/cni/net.d" in lines
    assert "mount --bind /lab/nodes/node-1/host/run-ciliary /run/ciliary" in lines
    assert lines.index("mount --make-shared /sys/fs/bpf") == lines.index("mount -t bpf bpf /sys/fs/bpf") + 1
    # the node's containerd state is not under the /run/ciliary it hides
    assert not str(PATHS.run).startswith("/run/ciliary/")


def test_chart_mode_kubelet_uses_the_cluster_dns_service() -> None:
    cfg = nodeconfig.kubelet_config(PATHS, HOST, client_ca=Path("/lab/pki/ca.crt"),
                                    cluster_dns=nodeconfig.CLUSTER_DNS_IP)
    assert cfg["clusterDNS"] == ["10.96.0.10"]
    assert "clusterDNS" not in nodeconfig.kubelet_config(PATHS, HOST, client_ca=Path("/lab/pki/ca.crt"))


def test_gateway_service_relays_parse() -> None:
    assert nodegateway.parse_service("198.51.100.1:443=6443") == (("198.51.100.1", 443), 6443)
    for bad in ("198.51.100.1=6443", ":443=1", "198.51.100.1:x=1", "198.51.100.1:443="):
        with pytest.raises(ValueError):
            nodegateway.parse_service(bad)


def test_kubelet_asks_the_apiserver_who_may_do_what() -> None:
    cfg = nodeconfig.kubelet_config(PATHS, HOST, client_ca=Path("/lab/pki/ca.crt"))
    assert cfg["authentication"]["anonymous"] == {"enabled": False}
    assert cfg["authentication"]["webhook"]["enabled"] is True
    assert cfg["authorization"]["mode"] == "Webhook"
