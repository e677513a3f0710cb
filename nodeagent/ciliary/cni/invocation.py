"""What the runtime passes in the environment: ``CNI_*`` variables and ``CNI_ARGS``.

Parsed once into a frozen :class:`Invocation`; missing or malformed variables are
CNI error 4 ("invalid necessary environment variables") naming the variables.
``CNI_ARGS`` is ``K=V`` pairs joined by ``;`` — kubelet passes
``IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;K8S_POD_INFRA_CONTAINER_ID=id;K8S_POD_UID=uid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ciliary.cni import errors

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
MAX_IFNAME = 15


@dataclass(frozen=True)
class Invocation:
    """One plugin call as described by its environment."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: tuple[str, ...] = ()
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse ``CNI_ARGS``; an empty string is no arguments, a pair without ``=`` is error 4."""
    parsed: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise errors.CniError(
                errors.ErrorCode.INVALID_ENVIRONMENT, "Invalid CNI_ARGS", f"{pair!r} is not a KEY=VALUE pair"
            )
        parsed[key.strip()] = value.strip()
    return parsed


def read_invocation(environ: Mapping[str, str]) -> Invocation:
    """Validate the variables each command needs (DEL tolerates an empty CNI_NETNS)."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise errors.CniError(
            errors.ErrorCode.INVALID_ENVIRONMENT,
            f"Invalid CNI_COMMAND {command!r}",
            f"CNI_COMMAND must be one of {', '.join(COMMANDS)}",
        )
    if command == "VERSION":
        return Invocation(command=command)
    required = ["CNI_CONTAINERID", "CNI_IFNAME"] + ([] if command == "DEL" else ["CNI_NETNS"])
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise errors.CniError(
            errors.ErrorCode.INVALID_ENVIRONMENT,
            f"Missing environment variables: {', '.join(missing)}",
            f"CNI_COMMAND={command} needs {', '.join(required)}",
        )
    ifname = environ["CNI_IFNAME"]
    if len(ifname) > MAX_IFNAME or "/" in ifname or ifname in (".", ".."):
        raise errors.CniError(
            errors.ErrorCode.INVALID_ENVIRONMENT, f"Invalid CNI_IFNAME {ifname!r}", "at most 15 characters, no '/'"
        )
    return Invocation(
        command=command,
        container_id=environ["CNI_CONTAINERID"],
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
    )
