"""Kubernetes API access: a kubernetes_asyncio client (kubeconfig or in-cluster) and the policy status write.

The policy kinds' API coordinates (``GROUP``, ``VERSION``, ``POLICY_PLURALS``)
live here once; :func:`patch_policy_status` is the one way both the operator's
status handover and an agent in direct-status mode patch a policy's status
subresource (a CNP when a namespace is given, a CCNP otherwise); :func:`secret_reader`
reads one Secret's items (TLS interception), raw, so nothing logs a model of it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from ciliary.operator.kube.cluster_model import secret_from_body

GROUP, VERSION = "cilium.io", "v2"
POLICY_PLURALS = {"CiliumNetworkPolicy": "ciliumnetworkpolicies",
                  "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies"}
MERGE_PATCH = "application/merge-patch+json"
NETPOL_GROUP, NETPOL_VERSION, NETPOL_PLURAL = "networking.k8s.io", "v1", "networkpolicies"
NETPOL_KIND = "NetworkPolicy"
"""Kubernetes NetworkPolicy: no status subresource for Ciliary; its enforcement is reported by Events."""


async def api_client(kubeconfig: Path | str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


async def patch_policy_status(custom: client.CustomObjectsApi, kind: str, namespace: str, name: str,
                              patch: Mapping[str, Any], *, timeout: float) -> Any:
    """JSON-merge-patch the status subresource of one policy; returns the object as written."""
    plural = POLICY_PLURALS[kind]
    if namespace:
        return await custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            GROUP, VERSION, namespace, plural, name, patch, _content_type=MERGE_PATCH, _request_timeout=timeout)
    return await custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]
        GROUP, VERSION, plural, name, patch, _content_type=MERGE_PATCH, _request_timeout=timeout)


def secret_reader(api: client.ApiClient, *, timeout: float = 5.0
                  ) -> Callable[[str, str], Awaitable[dict[str, bytes] | None]]:
    """``read(namespace, name)``: the Secret's decoded items, None when it does not exist (other errors raise)."""
    core = client.CoreV1Api(api)

    async def read(namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            response: Any = await core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        try:  # an aiohttp response (not preloaded into a model, so no error is raised for its status)
            status = int(response.status)
            body = json.loads(await response.read())
        finally:
            response.release()
        if status == 404:
            return None
        if status >= 400 or body.get("kind") != "Secret":
            raise ApiException(status=status, reason=str(body.get("reason", "unexpected answer")))
        return secret_from_body(body)

    return read
