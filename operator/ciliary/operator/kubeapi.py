"""A kubernetes_asyncio API client from a kubeconfig file, or from the in-cluster service account."""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio import client, config


async def api_client(kubeconfig: Path | str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)
