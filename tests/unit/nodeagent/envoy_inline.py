"""Test helper: the node's Envoy documents with each chain's routes inline (``envoy_rds.inline_routes``), one
document to read routes from and to give ``envoy --mode validate`` (which reads no dynamic resources)."""

from __future__ import annotations

from typing import Any

from ciliary.nodeagent import envoy_config, envoy_rds
from ciliary.operator import intents


def inline_document(intent: intents.NodeIntent, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """(version, the LDS document with its route configurations inline) of ``envoy_config.documents``."""
    docs = envoy_config.documents(intent, **kwargs)
    return docs.version, {**docs.listeners, "resources": envoy_rds.inline_routes(docs.listeners["resources"],
                                                                                 docs.routes)}
