"""etcd users and roles from ``store.access``: create them, keep their grants exact, enable authentication.

The async shell over etcd's Auth API for the rules :mod:`ciliary.operator.store.access`
computes. Users have no password: with ``--client-cert-auth`` etcd authenticates a
caller by its client certificate's CN. Every call here needs etcd's root user once
authentication is on (before that, any client). :func:`apply_role` is idempotent and
revokes grants the rules no longer name, so re-running it converges.
"""

from __future__ import annotations

import logging
from typing import Any

import aetcd
from aetcd import rpc

from ciliary.operator.store.access import ROOT_USER, Grant, Permission, Role

log = logging.getLogger(__name__)

_PERM_TYPES = {Permission.READ: rpc.Permission.READ, Permission.WRITE: rpc.Permission.WRITE,
               Permission.READWRITE: rpc.Permission.READWRITE}


class EtcdAuthError(RuntimeError):
    """An etcd Auth API call failed; carries the user or role it concerned."""

    def __init__(self, subject: str, cause: BaseException) -> None:
        super().__init__(f"etcd auth for {subject}: {cause}")
        self.subject = subject


def _stub(client: aetcd.Client) -> Any:
    if client.channel is None:
        raise RuntimeError("connect the client first")
    return rpc.AuthStub(client.channel)


async def _call(subject: str, method: Any, request: Any, timeout: float) -> Any:
    try:
        return await method(request, timeout=timeout)
    except rpc.AioRpcError as exc:
        raise EtcdAuthError(subject, exc) from exc


async def _exists(method: Any, request: Any, timeout: float) -> bool:
    try:
        await method(request, timeout=timeout)
    except rpc.AioRpcError as exc:
        if "not found" in (exc.details() or ""):
            return False
        raise
    return True


async def ensure_user(client: aetcd.Client, user: str, roles: tuple[str, ...], *, timeout: float = 5.0) -> None:
    """Create ``user`` (certificate-only, no password) if missing and grant it ``roles``."""
    await client.connect()
    auth = _stub(client)
    if not await _exists(auth.UserGet, rpc.AuthUserGetRequest(name=user), timeout):
        await _call(user, auth.UserAdd, rpc.AuthUserAddRequest(
            name=user, options=rpc.UserAddOptions(no_password=True)), timeout)
    got = await _call(user, auth.UserGet, rpc.AuthUserGetRequest(name=user), timeout)
    for role in roles:
        if role not in got.roles:
            await _call(user, auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=user, role=role), timeout)


async def apply_role(client: aetcd.Client, role: Role, *, timeout: float = 5.0) -> None:
    """Make etcd's role ``role.name`` hold exactly ``role.grants``, and its user hold the role."""
    await client.connect()
    auth = _stub(client)
    if not await _exists(auth.RoleGet, rpc.AuthRoleGetRequest(role=role.name), timeout):
        await _call(role.name, auth.RoleAdd, rpc.AuthRoleAddRequest(name=role.name), timeout)
    current = await _call(role.name, auth.RoleGet, rpc.AuthRoleGetRequest(role=role.name), timeout)
    wanted = {(_PERM_TYPES[g.permission], g.key.encode(), g.range_end.encode()) for g in role.grants}
    held = {(int(p.permType), bytes(p.key), bytes(p.range_end)) for p in current.perm}
    for _type, key, range_end in held - wanted:
        await _call(role.name, auth.RoleRevokePermission, rpc.AuthRoleRevokePermissionRequest(
            role=role.name, key=key, range_end=range_end), timeout)
    for grant in role.grants:
        entry = (_PERM_TYPES[grant.permission], grant.key.encode(), grant.range_end.encode())
        if entry not in held:
            await _call(role.name, auth.RoleGrantPermission, rpc.AuthRoleGrantPermissionRequest(
                name=role.name, perm=_permission(grant)), timeout)
    await ensure_user(client, role.user, (role.name,), timeout=timeout)
    log.info("etcd role applied", extra={"role": role.name, "grants": len(role.grants)})


def _permission(grant: Grant) -> Any:
    return rpc.Permission(permType=_PERM_TYPES[grant.permission], key=grant.key.encode(),
                          range_end=grant.range_end.encode())


async def delete_role(client: aetcd.Client, role: Role, *, timeout: float = 5.0) -> None:
    """Remove ``role`` and its user (a node that left); missing ones are fine."""
    await client.connect()
    auth = _stub(client)
    for method, request in ((auth.UserDelete, rpc.AuthUserDeleteRequest(name=role.user)),
                            (auth.RoleDelete, rpc.AuthRoleDeleteRequest(role=role.name))):
        try:
            await method(request, timeout=timeout)
        except rpc.AioRpcError as exc:
            if "not found" not in (exc.details() or ""):
                raise EtcdAuthError(role.name, exc) from exc


async def list_users(client: aetcd.Client, *, timeout: float = 5.0) -> list[str]:
    """The names of every etcd user (root only once authentication is on)."""
    await client.connect()
    listed = await _call("users", _stub(client).UserList, rpc.AuthUserListRequest(), timeout)
    return [str(user) for user in listed.users]


async def enable_auth(client: aetcd.Client, *, timeout: float = 5.0) -> None:
    """Create the ``root`` user with the ``root`` role (etcd's precondition) and turn authentication on.

    etcd knows the ``root`` role without it being added.
    """
    await client.connect()
    auth = _stub(client)
    status = await _call("auth", auth.AuthStatus, rpc.AuthStatusRequest(), timeout)
    if status.enabled:
        return
    await ensure_user(client, ROOT_USER, (ROOT_USER,), timeout=timeout)
    await _call("auth", auth.AuthEnable, rpc.AuthEnableRequest(), timeout)
    log.info("etcd authentication enabled")
