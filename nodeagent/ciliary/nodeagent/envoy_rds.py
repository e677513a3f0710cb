"""Route discovery (RDS) for the node's Envoy (pure: no I/O): one route configuration per HTTP filter chain.

Owns the name and file of a chain's route configuration (:func:`file_name`), the reference an HTTP
connection manager holds instead of inline routes (:func:`rds_reference`), the RDS document of one
route configuration (:func:`route_document`), reading Envoy's acknowledgements from its admin API
(:func:`accepted_routes`) and :func:`inline_routes` (for ``envoy --mode validate``, which reads no
dynamic resources).

Why: a filter chain holding its routes inline is replaced (and its connections drained) whenever its
rules change, and a kept-alive connection on the old chain is judged by the old rules until it closes.
With RDS the chain holds only the name of its route configuration; a change of HTTP rules, or of a
header value from a Secret, rewrites that route configuration alone, Envoy swaps it in place and the
next request of every connection on the chain is judged by the new rules (an HTTP connection manager
looks its route configuration up per request).

Files: Envoy's file-based RDS (``path_config_source``, as LDS and CDS) takes exactly one route
configuration per file (a file with two is rejected), so each chain's route configuration has its own
file, named after the chain (never after its content: the name must stay when the rules change) and
renamed into place like the LDS file. Each file is one subscription of Envoy, one inotify instance
(``fs.inotify.max_user_instances``, 128 by default per user, bounds the chains of one node's Envoy
together with everything else its user watches). So a node with more than :data:`MAX_ROUTE_FILES` chains
keeps its routes inline in the listeners (``envoy_config.documents``): a rules change then replaces the
chains it changes and drains their connections, as before RDS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
RDS_DIR = "rds"
"""The directory of the route configuration files, under the proxy's run directory (0700)."""
CONFIG_DUMP_PATH = "/config_dump?resource=dynamic_route_configs&mask=version_info,route_config.name"
"""The admin API query naming each route configuration Envoy holds and the version it acknowledged."""

MAX_ROUTE_FILES = 24
"""Route configurations served from files (one inotify instance each) per node Envoy; more chains: inline routes.
Two lab nodes share one machine's per-user budget with the kubelets and containerd."""


def file_name(route_config: str) -> str:
    """The file of a route configuration: its name made file-safe, plus a digest of the exact name (unique)."""
    safe = re.sub(r"[^A-Za-z0-9]+", "_", route_config).strip("_")[:80]
    return f"{safe}-{hashlib.sha256(route_config.encode()).hexdigest()[:12]}.json"


def rds_reference(route_config: str, rds_dir: str) -> dict[str, Any]:
    """The ``rds`` field of an HTTP connection manager: its route configuration by name, from its file."""
    return {"route_config_name": route_config,
            "config_source": {"path_config_source": {"path": os.path.join(rds_dir, file_name(route_config))},
                              "resource_api_version": "V3"}}


def route_configuration(name: str, routes: list[dict[str, Any]], *, validate_clusters: bool | None = None
                        ) -> dict[str, Any]:
    """One route configuration: a single virtual host for every authority, holding ``routes``."""
    out: dict[str, Any] = {"@type": ROUTE_CONFIG_TYPE, "name": name,
                           "virtual_hosts": [{"name": "any", "domains": ["*"], "routes": routes}]}
    if validate_clusters is not None:
        out["validate_clusters"] = validate_clusters
    return out


def route_document(config: dict[str, Any], version: str) -> dict[str, Any]:
    """The RDS DiscoveryResponse of one route configuration file."""
    return {"version_info": version, "resources": [config]}


def accepted_routes(config_dump: str) -> dict[str, str]:
    """Route configuration name -> the version Envoy holds, from :data:`CONFIG_DUMP_PATH`'s answer
    (an unreadable answer: nothing acknowledged)."""
    try:
        configs = json.loads(config_dump).get("configs", [])
    except (ValueError, AttributeError):
        return {}
    out: dict[str, str] = {}
    for item in configs if isinstance(configs, list) else []:
        if not isinstance(item, dict):
            continue
        name = (item.get("route_config") or {}).get("name")
        if isinstance(name, str):
            out[name] = str(item.get("version_info", ""))
    return out


def inline_routes(listeners: list[dict[str, Any]], routes: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``listeners`` with every RDS reference replaced by its route configuration (``routes``: name -> RDS
    document), as one document Envoy's validate mode reads whole."""
    out = json.loads(json.dumps(listeners))
    for listener in out:
        for chain in listener.get("filter_chains", []):
            for item in chain.get("filters", []):
                hcm = item.get("typed_config", {})
                if "rds" in hcm:
                    config = dict(routes[hcm.pop("rds")["route_config_name"]]["resources"][0])
                    config.pop("@type", None)
                    hcm["route_config"] = config
    return out
