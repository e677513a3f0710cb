"""``python -m ciliary.operator.kube.enroller``: the ``etcd-enroller`` sidecar that gives each node its etcd user.

It watches CertificateSigningRequests with ``signerName: ciliary.io/etcd-node`` (created by the
agent pod's ``etcd-enroll`` init container, ``ciliary.nodeagent.enroll``) and, for each one not
settled yet, asks ``enrollment.decide``:

* approve: create or converge that node's etcd user and role (``access.node_role``, as etcd
  root), add the ``Approved`` condition (``/approval``), sign with the etcd CA
  (``node_certificates.sign``: the CN alone, client auth only) and write ``status.certificate``
  (``/status``); a Normal Event.
* deny: the ``Denied`` condition with the reason, and a Warning Event.

A request someone else approved is still judged: if the rule refuses it, it gets ``Failed``
instead of a certificate. Idempotent (a settled CSR is skipped; conditions are added once);
a failed step is retried a bounded number of times (1, 2, 4 s apart), then the CSR gets
``Failed``. Every ``--resync`` seconds it lists everything again, so a missed event heals.

Node removal: every ``--sweep-interval`` seconds it deletes the etcd user and role of every
``ciliary-node-<n>`` user whose Node no longer exists (users listed before nodes, so a user
created meanwhile is never taken for stale). The certificate of a removed node then opens nothing.

This is the only process holding the etcd CA key and the etcd root certificate in the chart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ciliary.operator.kube import kubeapi, node_certificates
from ciliary.operator.kube.enrollment import SIGNER_NAME, decide
from ciliary.operator.kube.node_certificates import CertificateRequestError, SigningAuthority
from ciliary.operator.store import access, accounts
from ciliary.operator.store.etcdclient import (
    EtcdConfigError,
    EtcdEndpoint,
    EtcdTLS,
    connection_settings,
    make_client,
)

log = logging.getLogger("ciliary.operator.kube.enroller")
COMPONENT = "ciliary-etcd-enroller"
FIELD_SELECTOR = f"spec.signerName={SIGNER_NAME}"


class EnrollmentStepError(RuntimeError):
    """One step of handling a CSR failed (API or etcd); carries the CSR name."""

    def __init__(self, name: str, step: str, cause: BaseException) -> None:
        super().__init__(f"{name}: {step} failed: {cause}")
        self.name = name
        self.step = step


def stale_node_users(users: Iterable[str], nodes: Iterable[str]) -> list[str]:
    """The node users (``ciliary-node-<n>``) whose node is not among ``nodes``; other users never."""
    present = set(nodes)
    return sorted(u for u in users if (node := access.node_of_user(u)) is not None and node not in present)


class Enroller:
    """Judges, signs and records node certificate requests; removes departed nodes' etcd users."""

    def __init__(self, api: client.ApiClient, etcd_endpoint: EtcdEndpoint, etcd_root: EtcdTLS,
                 authority: SigningAuthority, *, agent_service_account: str, validity: datetime.timedelta,
                 event_namespace: str = "default", attempts: int = 4, retry_delay: float = 1.0) -> None:
        self.certificates = client.CertificatesV1Api(api)
        self.core = client.CoreV1Api(api)
        self.etcd_endpoint, self.etcd_root = etcd_endpoint, etcd_root
        self.authority = authority
        self.agent_service_account = agent_service_account
        self.validity = validity
        self.event_namespace = event_namespace
        self.attempts = attempts
        self.retry_delay = retry_delay

    # --- one CSR ------------------------------------------------------------------------------

    async def handle(self, obj: Mapping[str, Any]) -> str:
        """Bring one CSR to its end state; returns what happened (issued, denied, failed, skipped).

        A failed step (API or etcd) is retried ``attempts`` times with a growing pause, from the
        CSR as it is then; after that the CSR gets the ``Failed`` condition (its agent asks again).
        """
        name = str(obj["metadata"]["name"])
        if obj.get("spec", {}).get("signerName") != SIGNER_NAME or node_certificates.settled(obj):
            return "skipped"
        try:  # the watch may deliver an older copy than what this enroller already wrote
            obj = await _json(await self.certificates.read_certificate_signing_request(name, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return "skipped"
            log.warning("reading the request failed: %s", exc, extra={"csr": name})
        except OSError as exc:
            log.warning("reading the request failed: %s", exc, extra={"csr": name})
        if node_certificates.settled(obj):
            return "skipped"
        delay = self.retry_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._judge_and_act(obj)
            except EnrollmentStepError as exc:
                log.warning("enrollment step failed (attempt %d/%d): %s", attempt, self.attempts, exc,
                            extra={"csr": name, "step": exc.step})
                if attempt == self.attempts:
                    await self._fail(name, f"gave up after {attempt} attempts: {exc}")
                    return "failed"
            await asyncio.sleep(delay)
            delay *= 2
            try:
                obj = await _json(await self.certificates.read_certificate_signing_request(
                    name, _preload_content=False))
            except (ApiException, OSError) as exc:
                log.warning("re-reading the request failed: %s", exc, extra={"csr": name})
            if node_certificates.settled(obj):
                return "skipped"
        raise AssertionError("unreachable")

    async def _judge_and_act(self, obj: Mapping[str, Any]) -> str:
        name = str(obj["metadata"]["name"])
        try:
            request, csr = node_certificates.request_from_csr(obj)
        except CertificateRequestError as exc:
            return await self._deny(obj, str(exc))
        decision = decide(request, agent_service_account=self.agent_service_account)
        if not decision.approve or decision.node is None:
            if node_certificates.conditions(obj).get("Approved") == "True":
                await self._fail(name, f"approved by someone else, but refused: {decision.reason}")
                return "failed"
            return await self._deny(obj, decision.reason)
        try:  # signed before anything is written: a key the signer cannot use (Ed25519, DSA) is refused
            cert = node_certificates.sign(self.authority, csr, validity=self.validity, now=_now())
        except CertificateRequestError as exc:
            return await self._deny(obj, f"cannot sign this request: {exc}")
        await self._ensure_etcd_user(name, decision.node)
        if node_certificates.conditions(obj).get("Approved") != "True":
            await self._write(name, "approve", self.certificates.replace_certificate_signing_request_approval,
                              lambda cur: node_certificates.with_condition(
                                  cur, "Approved", "CiliaryEtcdNodeApproved", decision.reason, _now()))
        if not await self._write(name, "issue", self.certificates.replace_certificate_signing_request_status,
                                 lambda cur: node_certificates.with_certificate(cur, cert)):
            return "skipped"
        log.info("etcd certificate issued", extra={"csr": name, "node": decision.node, "cn": request.subject_cn})
        await self._event(obj, "Normal", "EtcdCertificateIssued",
                          f"issued {request.subject_cn} (node {decision.node}), valid until "
                          f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
        return "issued"

    async def _deny(self, obj: Mapping[str, Any], reason: str) -> str:
        name = str(obj["metadata"]["name"])
        await self._write(name, "deny", self.certificates.replace_certificate_signing_request_approval,
                          lambda cur: node_certificates.with_condition(
                              cur, "Denied", "CiliaryEtcdNodeDenied", reason, _now()))
        log.warning("etcd certificate request denied: %s", reason, extra={"csr": name})
        await self._event(obj, "Warning", "EtcdCertificateDenied", reason)
        return "denied"

    async def _fail(self, name: str, message: str) -> None:
        log.error("etcd certificate request failed: %s", message, extra={"csr": name})
        try:
            await self._write(name, "fail", self.certificates.replace_certificate_signing_request_status,
                              lambda cur: node_certificates.with_condition(
                                  cur, "Failed", "CiliaryEtcdNodeFailed", message, _now()))
        except EnrollmentStepError as exc:
            log.error("could not mark the request failed: %s", exc, extra={"csr": name})

    async def _write(self, name: str, step: str, method: Any, change: Any) -> bool:
        """Read the CSR, apply ``change`` and replace it through ``method``; re-read on a conflict (bounded).

        False when the CSR carries a certificate already (another enroller replica issued it): nothing is written.
        """
        for attempt in range(3):
            try:
                current = await _json(await self.certificates.read_certificate_signing_request(
                    name, _preload_content=False))
                if (current.get("status") or {}).get("certificate"):
                    return False  # issued meanwhile: a certificate is never replaced, nor anything after it
                await _json(await method(name, change(current), _preload_content=False))
                return True
            except ApiException as exc:
                if exc.status == 409 and attempt < 2:
                    continue
                raise EnrollmentStepError(name, step, exc) from exc
            except OSError as exc:
                raise EnrollmentStepError(name, step, exc) from exc
        raise AssertionError("unreachable")

    async def _ensure_etcd_user(self, name: str, node: str) -> None:
        etcd = make_client(self.etcd_endpoint, self.etcd_root, 10.0)
        try:
            await accounts.apply_role(etcd, access.node_role(node))
        except (aetcd.ClientError, accounts.EtcdAuthError) as exc:
            raise EnrollmentStepError(name, "etcd user", exc) from exc
        finally:
            await etcd.close()

    async def _event(self, obj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event about the (cluster-scoped) CSR; such Events live in ``default`` by the API's rule."""
        meta = obj["metadata"]
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": self.event_namespace},
                "involvedObject": {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                                   "name": meta["name"], "uid": meta.get("uid", "")},
                "type": kind, "reason": reason, "message": message[:1024], "count": 1,
                "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT, "reportingInstance": os.environ.get("HOSTNAME", COMPONENT)}
        try:
            await _json(await self.core.create_namespaced_event(
                self.event_namespace, body, _preload_content=False))  # type: ignore[arg-type]
        except (ApiException, OSError) as exc:
            log.warning("could not post the Event: %s", exc, extra={"csr": meta["name"]})

    # --- the loops ----------------------------------------------------------------------------

    async def resync(self) -> str:
        """Handle every CSR of our signer once; returns the list's resourceVersion for the watch."""
        listed = await _json(await self.certificates.list_certificate_signing_request(
            field_selector=FIELD_SELECTOR, _preload_content=False))
        for item in listed.get("items", []):
            await self.handle(item)
        return str(listed.get("metadata", {}).get("resourceVersion", ""))

    async def watch_once(self, seconds: int) -> None:
        """List, then watch for ``seconds``; a CSR whose handling must be retried is retried at the next list."""
        version = await self.resync()
        stream = watch.Watch(return_type="object")  # the raw JSON, no client models
        try:
            async for event in stream.stream(self.certificates.list_certificate_signing_request,
                                             field_selector=FIELD_SELECTOR, resource_version=version,
                                             timeout_seconds=seconds):
                if event["type"] in ("ADDED", "MODIFIED"):
                    await self.handle(event["raw_object"])
        finally:
            await stream.close()

    async def sweep(self) -> list[str]:
        """Delete the etcd users of nodes that no longer exist; returns the users removed."""
        etcd = make_client(self.etcd_endpoint, self.etcd_root, 10.0)
        try:
            users = await accounts.list_users(etcd)
            listed = await _json(await self.core.list_node(_preload_content=False))
            nodes = [str(n["metadata"]["name"]) for n in listed.get("items", [])]
            stale = stale_node_users(users, nodes)
            for user in stale:
                node = access.node_of_user(user)
                assert node is not None
                await accounts.delete_role(etcd, access.node_role(node))
                log.info("etcd user of a removed node deleted", extra={"user": user, "node": node})
            return stale
        finally:
            await etcd.close()

    async def run(self, *, resync_seconds: int, sweep_seconds: float) -> None:
        async def sweeping() -> None:
            while True:
                try:
                    await self.sweep()
                except (ApiException, OSError, aiohttp.ClientError, aetcd.ClientError, accounts.EtcdAuthError) as exc:
                    log.warning("node-user sweep failed: %s", exc)
                await asyncio.sleep(sweep_seconds)

        sweeper = asyncio.create_task(sweeping()) if sweep_seconds > 0 else None
        try:
            while True:
                try:
                    await self.watch_once(resync_seconds)
                except (TimeoutError, ApiException, OSError, aiohttp.ClientError) as exc:
                    log.warning("CSR watch interrupted: %s; listing again", exc)
                    await asyncio.sleep(2.0)
        finally:
            if sweeper is not None:
                sweeper.cancel()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def _json(response: Any) -> dict[str, Any]:
    """The body of a response fetched with ``_preload_content=False`` (raw JSON, no client models).

    The client checks no status without preloading: a refusal (403, 409, ...) is raised here as
    :class:`ApiException`, as the client would.
    """
    try:
        if not 200 <= int(response.status) <= 299:
            body = (await response.read()).decode(errors="replace")
            raise ApiException(status=int(response.status), reason=f"{response.reason}: {body[:500]}")
        data: dict[str, Any] = await response.json()
        return data
    finally:
        response.release()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ciliary-etcd-enroller", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", default=env("CILIARY_ENROLLER_KUBECONFIG", ""), help="default: in-cluster")
    p.add_argument("--etcd-endpoints", default=env("CILIARY_ENROLLER_ETCD_ENDPOINTS", "https://127.0.0.1:2379"))
    p.add_argument("--etcd-ca-file", default=env("CILIARY_ENROLLER_ETCD_CA_FILE", ""))
    p.add_argument("--etcd-cert-file", default=env("CILIARY_ENROLLER_ETCD_CERT_FILE", ""),
                   help="etcd root's client certificate (CN root)")
    p.add_argument("--etcd-key-file", default=env("CILIARY_ENROLLER_ETCD_KEY_FILE", ""))
    p.add_argument("--signing-ca-file", default=env("CILIARY_ENROLLER_SIGNING_CA_FILE", ""),
                   help="the etcd CA certificate that signs node certificates")
    p.add_argument("--signing-key-file", default=env("CILIARY_ENROLLER_SIGNING_KEY_FILE", ""))
    p.add_argument("--agent-service-account", default=env("CILIARY_ENROLLER_AGENT_SERVICE_ACCOUNT", ""),
                   help="system:serviceaccount:<namespace>:<name> of the agents")
    p.add_argument("--validity-days", type=float, default=float(env("CILIARY_ENROLLER_VALIDITY_DAYS", "365")))
    p.add_argument("--event-namespace", default="default")
    p.add_argument("--resync", type=int, default=300, help="seconds between full lists of the CSRs")
    p.add_argument("--sweep-interval", type=float, default=float(env("CILIARY_ENROLLER_SWEEP_INTERVAL", "60")),
                   help="seconds between removals of departed nodes' etcd users (0: never)")
    p.add_argument("--log-level", default=env("CILIARY_ENROLLER_LOG_LEVEL", "INFO"))
    return p


async def run(args: argparse.Namespace) -> None:
    endpoints, tls = connection_settings(args.etcd_endpoints, ca_file=args.etcd_ca_file,
                                         cert_file=args.etcd_cert_file, key_file=args.etcd_key_file)
    if tls is None:
        raise EtcdConfigError("the enroller needs etcd's root client certificate (https endpoints)")
    authority = SigningAuthority.from_pem(Path(args.signing_ca_file).read_bytes(),
                                          Path(args.signing_key_file).read_bytes())
    api = await kubeapi.api_client(args.kubeconfig or None)
    try:
        enroller = Enroller(api, endpoints[0], tls, authority, agent_service_account=args.agent_service_account,
                            validity=datetime.timedelta(days=args.validity_days),
                            event_namespace=args.event_namespace)
        log.info("enrolling nodes", extra={"signer": SIGNER_NAME, "agent": args.agent_service_account})
        await enroller.run(resync_seconds=args.resync, sweep_seconds=args.sweep_interval)
    finally:
        await api.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.agent_service_account.startswith("system:serviceaccount:"):
        parser.error("--agent-service-account must be system:serviceaccount:<namespace>:<name>")
    if not (args.signing_ca_file and args.signing_key_file):
        parser.error("--signing-ca-file and --signing-key-file are required")
    try:
        asyncio.run(run(args))
    except EtcdConfigError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
