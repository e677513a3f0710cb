"""The lab's per-node pod runtime: a small kubelet for Pods bound to one node.

It watches Pods with ``spec.nodeName=<node>``, realises each one (``sandboxes``),
reports ``status`` (podIP, podIPs, hostIP, phase Running, Ready) and removes
everything when the Pod is deleted, confirming graceful deletion as a kubelet
does. A Pod it cannot realise gets a Warning Event and stays Pending; it is
retried with a bounded back-off. It also keeps the Node Ready (status condition
and a Lease in kube-node-lease). Run: ``python -m ciliary.lab.podruntime --node node-1``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from ciliary.lab import sandboxes
from ciliary.lab.kubeclient import now, now_micro, post_event
from ciliary.lab.layout import LabLayout, node_index, node_ip
from ciliary.operator.kube import kubeapi

log = logging.getLogger("ciliary.lab.podruntime")
COMPONENT = "ciliary-lab-runtime"
HEARTBEAT_SECONDS = 10


def summarise(pod: client.V1Pod) -> sandboxes.PodSpecSummary:
    summary = sandboxes.PodSpecSummary(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid)
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            proto = (port.protocol or "TCP").upper()
            (summary.udp_ports if proto == "UDP" else summary.tcp_ports).append(int(port.container_port))
    return summary


class PodRuntime:
    def __init__(self, ctx: sandboxes.NodeContext, api: client.ApiClient) -> None:
        self.ctx = ctx
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.boxes = sandboxes.Sandbox.load_all(ctx.state_dir)
        self.locks: dict[str, asyncio.Lock] = {}
        self.retry_tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, int] = {}

    # --- node --------------------------------------------------------------
    async def heartbeat(self) -> None:
        node = self.ctx.node
        while True:
            try:
                await self._renew_lease()
                await self.core.patch_node_status(node, {"status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "CiliaryLabRuntimeReady",
                                    "message": "ciliary lab runtime is running", "lastHeartbeatTime": now(),
                                    "lastTransitionTime": now()}],
                    "addresses": [{"type": "InternalIP", "address": node_ip(node_index(node))},
                                  {"type": "Hostname", "address": node}],
                    "nodeInfo": {"kubeletVersion": "ciliary-lab", "containerRuntimeVersion": "ciliary-lab://1",
                                 "architecture": "amd64", "operatingSystem": "linux", "kernelVersion": "",
                                 "osImage": "ciliary lab", "bootID": "", "machineID": "", "systemUUID": "",
                                 "kubeProxyVersion": ""},
                }})
            except ApiException as exc:
                log.warning("node heartbeat failed: %s", exc.reason)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _renew_lease(self) -> None:
        body: Any = {"metadata": {"name": self.ctx.node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.ctx.node, "leaseDurationSeconds": 40, "renewTime": now_micro()}}
        try:
            await self.coordination.patch_namespaced_lease(self.ctx.node, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await self.coordination.create_namespaced_lease("kube-node-lease", body)

    # --- pods --------------------------------------------------------------
    async def run(self) -> None:
        selector = f"spec.nodeName={self.ctx.node}"
        pods = await self.core.list_pod_for_all_namespaces(field_selector=selector)
        live = {p.metadata.uid for p in pods.items}
        for uid in list(self.boxes):
            if uid not in live:
                await self._teardown_uid(uid)
        for pod in pods.items:
            await self.handle(pod)
        rv = pods.metadata.resource_version
        while True:
            stream = watch.Watch()
            try:
                async for event in stream.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                                 resource_version=rv, timeout_seconds=240):
                    pod = event["object"]
                    rv = pod.metadata.resource_version
                    if event["type"] == "DELETED":
                        await self._teardown_uid(pod.metadata.uid)
                    else:
                        await self.handle(pod)
            except ApiException as exc:
                if exc.status != 410:
                    raise
                # resource version too old: relist
                pods = await self.core.list_pod_for_all_namespaces(field_selector=selector)
                rv = pods.metadata.resource_version
                for pod in pods.items:
                    await self.handle(pod)
            finally:
                stream.stop()

    async def handle(self, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        lock = self.locks.setdefault(uid, asyncio.Lock())
        async with lock:
            if pod.metadata.deletion_timestamp:
                await self._teardown_uid(uid)
                await self._confirm_deletion(pod)
                return
            box = self.boxes.get(uid)
            if box and sandboxes.workload_alive(box):
                if (pod.status.phase != "Running") or pod.status.pod_ip != box.ipv4:
                    await self._report_running(pod, box)
                return
            pending_retry = self.retry_tasks.get(uid)
            if pending_retry and not pending_retry.done() and pending_retry is not asyncio.current_task():
                return  # failed recently: the scheduled retry will try again (bounded back-off)
            if box:  # workload died: rebuild
                await self._teardown_uid(uid)
            await self._realise(pod)

    async def _realise(self, pod: client.V1Pod) -> None:
        summary = summarise(pod)
        ref = {"kind": "Pod", "namespace": summary.namespace, "name": summary.name, "uid": summary.uid}
        try:
            box = await asyncio.to_thread(sandboxes.realise, self.ctx, summary)
        except sandboxes.SandboxError as exc:
            log.warning("pod %s/%s not realised: %s", summary.namespace, summary.name, exc.message)
            await post_event(self.core, obj=ref, reason=exc.reason, message=exc.message,
                             component=COMPONENT, host=self.ctx.node)
            await self._report_pending(pod, exc)
            self._schedule_retry(pod)
            return
        self.boxes[box.uid] = box
        self.failures.pop(box.uid, None)
        log.info("pod %s/%s running with %s", box.namespace, box.name, box.ipv4)
        await post_event(self.core, obj=ref, reason="Started", type_="Normal", component=COMPONENT,
                         host=self.ctx.node, message=f"Pod network {box.ipv4} and workload started on {self.ctx.node}")
        await self._report_running(pod, box)

    def _schedule_retry(self, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        count = self.failures[uid] = self.failures.get(uid, 0) + 1
        delay = min(60.0, 2.0 * 2 ** min(count, 5))
        old = self.retry_tasks.get(uid)
        if old and not old.done() and old is not asyncio.current_task():
            return

        async def retry() -> None:
            await asyncio.sleep(delay)
            try:
                fresh = await self.core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
            except ApiException:
                return
            if fresh.metadata.uid == uid:
                await self.handle(fresh)

        self.retry_tasks[uid] = asyncio.create_task(retry())

    async def _teardown_uid(self, uid: str) -> None:
        box = self.boxes.pop(uid, None)
        task = self.retry_tasks.pop(uid, None)
        if task and task is not asyncio.current_task():
            task.cancel()
        if box:
            problems = await asyncio.to_thread(sandboxes.teardown, self.ctx, box)
            for problem in problems:
                log.warning("pod %s/%s teardown: %s", box.namespace, box.name, problem)
            log.info("pod %s/%s removed", box.namespace, box.name)

    async def _confirm_deletion(self, pod: client.V1Pod) -> None:
        try:
            await self.core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    async def _patch_status(self, pod: client.V1Pod, status: dict[str, Any]) -> None:
        try:
            await self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                                        {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                log.warning("status patch of %s/%s failed: %s", pod.metadata.namespace, pod.metadata.name,
                            exc.reason)

    async def _report_running(self, pod: client.V1Pod, box: sandboxes.Sandbox) -> None:
        ts = now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": ts}
                      for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        statuses = [{"name": c.name, "image": c.image or "ciliary-lab", "imageID": "", "ready": True,
                     "restartCount": 0, "started": True, "containerID": f"ciliary-lab://{box.container_id}",
                     "state": {"running": {"startedAt": ts}}} for c in pod.spec.containers]
        await self._patch_status(pod, {
            "phase": "Running", "podIP": box.ipv4, "podIPs": [{"ip": box.ipv4}],
            "hostIP": node_ip(node_index(self.ctx.node)), "hostIPs": [{"ip": node_ip(node_index(self.ctx.node))}],
            "startTime": ts, "conditions": conditions, "containerStatuses": statuses,
        })

    async def _report_pending(self, pod: client.V1Pod, exc: sandboxes.SandboxError) -> None:
        await self._patch_status(pod, {"phase": "Pending", "conditions": [
            {"type": "Ready", "status": "False", "reason": exc.reason, "message": exc.message,
             "lastTransitionTime": now()}]})


async def amain(node: str, layout: LabLayout) -> None:
    api = await kubeapi.api_client(layout.state_dir / "runtime.kubeconfig")
    core = client.CoreV1Api(api)
    node_obj = await core.read_node(node)
    cni_bin = Path(sys.executable).parent / "ciliary-cni"
    if not cni_bin.exists():
        found = shutil.which("ciliary-cni")
        if not found:
            raise SystemExit("ciliary-cni is not installed next to this Python or on PATH")
        cni_bin = Path(found)
    ctx = sandboxes.NodeContext(layout=layout, node=node, pod_cidr=node_obj.spec.pod_cidr, cni_bin=cni_bin)
    runtime = PodRuntime(ctx, api)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(runtime.heartbeat()), asyncio.create_task(runtime.run())]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopper]:
        task.cancel()
    for task in done:
        if task is not stopper and task.exception():
            raise task.exception()  # type: ignore[misc]
    await api.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ciliary lab pod runtime for one node (a small kubelet)")
    parser.add_argument("--node", required=True, help="node name, e.g. node-1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s node=" + args.node
                        + " %(message)s")
    asyncio.run(amain(args.node, LabLayout.from_env()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
