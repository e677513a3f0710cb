#!/usr/bin/env bash
# Builds the real `hubble` CLI (issue 11: the client the e2e tests point at Ciliary's Observer API and
# relay) from the github.com/cilium/cilium Go module and caches it outside the repository, keyed by
# version, like build-go-tools.sh does for the control plane:
#   $CILIARY_CACHE/bin/hubble-<ver>/hubble
# A second run finds the binary and returns at once (cold build: ~5 min on 2 cores, ~140 MB of modules).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/versions.env"
CACHE="${CILIARY_CACHE:-/var/cache/ciliary}"
HUBBLE_DIR="$CACHE/bin/hubble-$HUBBLE_VERSION"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[setup] %s\n' "$*"; }

# A binary that does not know its version (built before the -X flag below) is rebuilt once.
built() { [ -x "$HUBBLE_DIR/hubble" ] && "$HUBBLE_DIR/hubble" version 2>/dev/null | grep -q "^hubble $HUBBLE_VERSION "; }
built && exit 0
command -v go >/dev/null || { echo "setup: Go is needed to build hubble $HUBBLE_VERSION" >&2; exit 1; }
grep -qE "^[[:space:]]*github.com/cilium/cilium $HUBBLE_VERSION( |$)" "$HERE/go/hubble/go.mod" || {
  echo "setup: setup/go/hubble/go.mod does not require github.com/cilium/cilium $HUBBLE_VERSION (versions.env)" >&2
  exit 1; }
mkdir -p "$CACHE/bin"
exec 8>"$CACHE/.hubble-build.lock"
flock 8
built && exit 0
log "building the hubble CLI from github.com/cilium/cilium $HUBBLE_VERSION (cold: ~5 min)"
t0=$(date +%s)
tmp="$HUBBLE_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
(cd "$HERE/go/hubble" && go build -trimpath -buildvcs=false \
    -ldflags "-s -w -X github.com/cilium/cilium/hubble/pkg.Version=$HUBBLE_VERSION" -o "$tmp/hubble" \
    github.com/cilium/cilium/hubble)
rm -rf "$HUBBLE_DIR"; mv "$tmp" "$HUBBLE_DIR"
log "built $("$HUBBLE_DIR/hubble" version 2>/dev/null | head -1) in $(( $(date +%s) - t0 )) s"
