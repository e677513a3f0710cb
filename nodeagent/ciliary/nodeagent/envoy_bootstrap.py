"""Envoy's start-up configuration (pure): admin socket, the original-destination clusters, LDS and CDS files.

Owns :func:`bootstrap` (``envoy_config`` re-exports it) and the socket mark of the ingress
listener's upstream connections. What the files then hold is ``envoy_config``'s (listeners) and
``envoy_tls``'s (the TLS clusters of egress interception).
"""

from __future__ import annotations

from typing import Any

from ciliary.nodeagent import envoy_routes

CLUSTER_NAME = envoy_routes.CLUSTER_NAME
EGRESS_CLUSTER_NAME = envoy_routes.EGRESS_CLUSTER_NAME
FROM_PROXY_MARK = 0x0D00
"""Socket mark of the proxy's upstream connections (the tc program lets them through)."""
SOL_SOCKET, SO_MARK = 1, 36


def bootstrap(*, node: str, admin_socket: str, lds_path: str, cds_path: str = "",
              upstream_mark: int = FROM_PROXY_MARK) -> dict[str, Any]:
    """Envoy's start-up configuration: admin on a unix socket, the original-destination cluster, LDS from a file."""
    return {
        "node": {"id": node, "cluster": "ciliary"},
        "admin": {"address": {"pipe": {"path": admin_socket}}},
        "static_resources": {"clusters": [{
            "name": CLUSTER_NAME,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True},
            "connect_timeout": "5s",
            "cleanup_interval": "60s",
            "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                 "max_requests": 100000}]},
            "upstream_bind_config": {
                "source_address": {"address": "0.0.0.0", "port_value": 0},
                "socket_options": [{"level": SOL_SOCKET, "name": SO_MARK, "int_value": upstream_mark,
                                    "state": "STATE_PREBIND"}]},
        }, {
            # the egress listener's: its original_src filter binds each upstream connection to the
            # client pod's address and sets FROM_EGRESS_PROXY_MARK
            "name": EGRESS_CLUSTER_NAME,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True},
            "connect_timeout": "5s",
            "cleanup_interval": "60s",
            "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                 "max_requests": 100000}]},
        }]},
        "dynamic_resources": {"lds_config": {"path_config_source": {"path": lds_path},
                                             "resource_api_version": "V3"},
                              **({"cds_config": {"path_config_source": {"path": cds_path},
                                                 "resource_api_version": "V3"}} if cds_path else {})},
    }
