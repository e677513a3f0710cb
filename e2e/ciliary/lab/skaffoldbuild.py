"""skaffold's custom builder for the lab (``skaffold.yaml`` profile ``lab``): the project's images, no docker.

skaffold runs ``python -m ciliary.lab.skaffoldbuild`` once per artifact with ``IMAGE`` (the full name it
wants, e.g. ``localhost:PORT/ciliary-agent:<tag>``), ``PUSH_IMAGE`` and ``BUILD_CONTEXT`` set. The image
is the Dockerfile target the name ends with (``ciliary-operator`` or ``ciliary-agent``), built by
``ciliary.lab.projectimages`` (cached by content: an unchanged tree is not rebuilt) and pushed from its
OCI layout to the registry ``IMAGE`` names (``ciliary.lab.registrypush``; the lab registry). skaffold then
reads the digest from the registry and deploys the charts with ``<repo>:<tag>@<digest>``. Without
``PUSH_IMAGE=true`` there is nothing to do with the image (no docker daemon to load it into): an error.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from ciliary.lab import images, projectimages, registrypush

TARGETS = {"ciliary-operator": "operator", "ciliary-agent": "agent"}


class CustomBuildError(RuntimeError):
    """skaffold asked for something this builder cannot do; carries the image."""

    def __init__(self, image: str, message: str) -> None:
        super().__init__(f"{image}: {message}")
        self.image = image


def target_of(image: str) -> str:
    _, name, _ = registrypush.split_reference(image)
    target = TARGETS.get(name.rsplit("/", 1)[-1])
    if target is None:
        raise CustomBuildError(image, f"not one of the project's images ({', '.join(TARGETS)})")
    return target


def build(environ: Mapping[str, str]) -> str:
    image = environ.get("IMAGE", "")
    if not image:
        raise CustomBuildError("?", "IMAGE is not set (run by skaffold's custom builder)")
    if environ.get("PUSH_IMAGE", "false") != "true":
        raise CustomBuildError(image, "only pushing builds are supported (no docker daemon to load into): "
                                      "use a registry, e.g. skaffold run -p lab --default-repo localhost:PORT")
    root = Path(environ.get("BUILD_CONTEXT", ".")).resolve()
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    built = projectimages.project_image(root, images.debian_suite(), target_of(image), version)
    digest = registrypush.push_layout(built.layout, image)
    print(f"[skaffoldbuild] {image} ← {built.reference} ({digest})", flush=True)
    return digest


def main() -> int:
    try:
        build(os.environ)
    except (CustomBuildError, registrypush.PushError, images.ImageBuildError, ValueError) as exc:
        print(f"skaffoldbuild: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
