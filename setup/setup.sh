#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine (run as root); both README
# commands start with it. A second run takes seconds.
#  1. Debian packages (bcc, bpftool, kernel headers, iproute2, iptables, openssl, ...)
#  2. kernel headers linked where bcc looks for them, when the running kernel has none
#  3. the venv (.venv) with the project installed, and Debian's bcc exposed to it
#  4. the control-plane binaries, built from Go modules and cached by version
#  5. the real-node binaries (containerd, kubelet, scheduler, kube-proxy, agnhost, registry, e2e.test,
#     skaffold; build-node-tools.sh) and the lab's images (ciliary.lab.images), cached by version/content
#  6. the hubble CLI (build-hubble.sh), cached by version
# Debian's chromium is the service map's browser test's browser (driven by playwright, no browser download)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CILIARY_VENV:-$ROOT/.venv}"
STAMP_DIR="${CILIARY_CACHE:-/var/cache/ciliary}/stamps"
mkdir -p "$STAMP_DIR"
log() { printf '[setup] %s\n' "$*"; }
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then echo "setup: run as root (the lab creates network namespaces and loads eBPF)" >&2; exit 1; fi

# --- 1. Debian packages -------------------------------------------------------
APT_PACKAGES=(python3 python3-venv python3-dev python3-bpfcc libbpf1 bpftool linux-headers-amd64 iproute2 iptables
              openssl curl ca-certificates iputils-ping util-linux etcd-server etcd-client jq procps psmisc git make golang-go
              runc mmdebstrap prometheus chromium nftables)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Go: only needed from Debian when no go is on PATH (the machine may ship a newer one)
if command -v go >/dev/null; then
  tmp=(); for p in "${missing[@]}"; do [ "$p" = golang-go ] || tmp+=("$p"); done; missing=("${tmp[@]+"${tmp[@]}"}")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. kernel headers for bcc ---------------------------------------------------
KREL="$(uname -r)"
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
  hdr_build="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
  hdr_common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
  if [ -n "$hdr_build" ] && [ -n "$hdr_common" ]; then
    log "linking kernel headers for $KREL: $hdr_build"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr_build" "/lib/modules/$KREL/build"
    ln -sfn "$hdr_common" "/lib/modules/$KREL/source"
  else
    echo "setup: no kernel headers under /usr/src; bcc cannot compile" >&2; exit 1
  fi
fi

# --- 3. bpffs --------------------------------------------------------------------
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# --- 4. the venv -----------------------------------------------------------------
PY="${CILIARY_PYTHON:-/usr/bin/python3}"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Debian's bcc (pure Python over libbcc) goes into the venv through a symlink;
# `pip install bcc` would fetch an unrelated package.
[ -e "$SITE/bcc" ] || ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
hash_now="$(cat "$ROOT/pyproject.toml" "$ROOT/setup/requirements-lock.txt" 2>/dev/null | sha256sum | cut -c1-16)"
stamp="$VENV/.ciliary-installed"
# setuptools builds in ./build and never removes a module deleted from the source: start clean
rm -rf "$ROOT/build"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash_now" ]; then
  log "installing Python packages into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/setup/requirements-lock.txt" "$ROOT[dev]"
  echo "$hash_now" > "$stamp"
else
  # the project itself changes often: reinstall only it, without dependencies (fast)
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$ROOT" >/dev/null
fi

# --- 5. control-plane binaries (built from Go modules, cached by version) --------
"$ROOT/setup/build-go-tools.sh"

# --- 6. real-node binaries and images (issue 14; cached by version and by content) -----
# images (mmdebstrap: mostly network and disk) build while the registry's Go build runs.
# e2e.test and skaffold (~16 min cold together) are not built here until something runs them
# (`make conformance`, `skaffold dev` against the lab): `setup/build-node-tools.sh e2e skaffold`.
# The images hold agnhost and CoreDNS (the agnhost image serves cluster DNS in conformance tests):
# those are built before; the registry's build runs beside the images.
"$ROOT/setup/build-node-tools.sh" containerd kubernetes-node coredns
(cd "$ROOT" && "$VENV/bin/python" -m ciliary.lab.images build) &
images_pid=$!
"$ROOT/setup/build-node-tools.sh" registry
wait "$images_pid"

# --- 7. the hubble CLI (issue 11: the Observer API's test client; cached by version) ---------
"$ROOT/setup/build-hubble.sh"

log "ready in $(( $(date +%s) - t0 )) s"
