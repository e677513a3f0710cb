"""The lab's scheduler: binds unscheduled Pods to Ready nodes, round-robin.

A Pod's ``nodeSelector`` is honoured (only nodes whose labels match are
candidates). A Pod bound by the user to a node that does not exist gets a
Warning Event (``NodeNotFound``) and stays Pending. Run:
``python -m ciliary.lab.scheduling``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from ciliary.lab.kubeclient import post_event
from ciliary.lab.layout import LabLayout
from ciliary.operator.kube import kubeapi

log = logging.getLogger("ciliary.lab.scheduling")
COMPONENT = "ciliary-lab-scheduler"


def _ready(node: client.V1Node) -> bool:
    for cond in (node.status.conditions or []) if node.status else []:
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return False


class Scheduler:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.counter = itertools.count()
        self.warned: set[str] = set()

    async def candidates(self, pod: client.V1Pod) -> list[str]:
        nodes = (await self.core.list_node()).items
        selector: dict[str, str] = pod.spec.node_selector or {}
        names = [n.metadata.name for n in nodes if _ready(n)
                 and all((n.metadata.labels or {}).get(k) == v for k, v in selector.items())]
        return sorted(names, key=lambda n: (len(n), n))

    async def handle(self, pod: client.V1Pod) -> None:
        if pod.metadata.deletion_timestamp or pod.status.phase in ("Succeeded", "Failed"):
            return
        ref: dict[str, Any] = {"kind": "Pod", "namespace": pod.metadata.namespace,
                               "name": pod.metadata.name, "uid": pod.metadata.uid}
        if pod.spec.node_name:
            if pod.metadata.uid in self.warned or pod.status.phase == "Running":
                return
            try:
                await self.core.read_node(pod.spec.node_name)
            except ApiException as exc:
                if exc.status == 404:
                    self.warned.add(pod.metadata.uid)
                    await post_event(self.core, obj=ref, reason="NodeNotFound", component=COMPONENT,
                                     message=f"Pod is bound to node {pod.spec.node_name!r}, which does not exist; "
                                             "it stays Pending")
            return
        nodes = await self.candidates(pod)
        if not nodes:
            if pod.metadata.uid not in self.warned:
                self.warned.add(pod.metadata.uid)
                await post_event(self.core, obj=ref, reason="FailedScheduling", component=COMPONENT,
                                 message="no Ready node matches the Pod's nodeSelector")
            return
        target = nodes[next(self.counter) % len(nodes)]
        binding: Any = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": pod.metadata.name, "namespace": pod.metadata.namespace},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": target}}
        try:
            await self.core.create_namespaced_binding(pod.metadata.namespace, binding, _preload_content=False)
        except ApiException as exc:
            log.warning("binding %s/%s to %s failed: %s", pod.metadata.namespace, pod.metadata.name, target,
                        exc.reason)
            return
        self.warned.discard(pod.metadata.uid)
        await post_event(self.core, obj=ref, reason="Scheduled", type_="Normal", component=COMPONENT,
                         message=f"Successfully assigned {pod.metadata.namespace}/{pod.metadata.name} to {target}")
        log.info("bound %s/%s to %s", pod.metadata.namespace, pod.metadata.name, target)

    async def run(self) -> None:
        rv = ""
        while True:
            pods = await self.core.list_pod_for_all_namespaces()
            for pod in pods.items:
                await self.handle(pod)
            rv = pods.metadata.resource_version
            stream = watch.Watch()
            try:
                async for event in stream.stream(self.core.list_pod_for_all_namespaces, resource_version=rv,
                                                 timeout_seconds=60):
                    if event["type"] != "DELETED":
                        await self.handle(event["object"])
            except ApiException as exc:
                if exc.status != 410:
                    raise
            finally:
                stream.stop()
            # every minute: relist, which also retries pods no node could take


async def amain(layout: LabLayout) -> None:
    api = await kubeapi.api_client(layout.state_dir / "runtime.kubeconfig")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(Scheduler(api).run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopper.cancel()
    if task.done() and not task.cancelled() and task.exception():
        raise task.exception()  # type: ignore[misc]
    await api.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(amain(LabLayout.from_env()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
