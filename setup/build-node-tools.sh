#!/usr/bin/env bash
# Builds the Go-made tools that real lab nodes run (issue 14) from Go modules and caches them outside
# the repository, keyed by version, like build-go-tools.sh does for the control plane:
#   $CILIARY_CACHE/bin/containerd-<ver>/       containerd, containerd-shim-runc-v2, ctr
#   $CILIARY_CACHE/bin/kubernetes-node-<ver>/  kubelet, kube-scheduler, kube-proxy, agnhost
#   $CILIARY_CACHE/bin/registry-<ver>/         registry (distribution)
#   $CILIARY_CACHE/bin/kubernetes-e2e-<ver>/   e2e.test            (skipped with CILIARY_SKIP_E2E_TEST=1)
#   $CILIARY_CACHE/bin/skaffold-<ver>/         skaffold            (skipped with CILIARY_SKIP_SKAFFOLD=1)
#   $CILIARY_CACHE/bin/coredns-<ver>/          coredns             (cluster DNS of a real-node lab)
# A second run finds the binaries and returns at once. Each step logs its build time.
# With an argument list, only those steps run (containerd kubernetes-node registry coredns e2e skaffold).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/versions.env"
CACHE="${CILIARY_CACHE:-/var/cache/ciliary}"
CONTAINERD_DIR="$CACHE/bin/containerd-$CONTAINERD_VERSION"
KNODE_DIR="$CACHE/bin/kubernetes-node-$KUBERNETES_VERSION"
E2E_DIR="$CACHE/bin/kubernetes-e2e-$KUBERNETES_VERSION"
REGISTRY_DIR="$CACHE/bin/registry-$REGISTRY_VERSION"
SKAFFOLD_DIR="$CACHE/bin/skaffold-$SKAFFOLD_VERSION"
COREDNS_DIR="$CACHE/bin/coredns-$COREDNS_VERSION"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf '[setup] %s\n' "$*"; }
have_all() { local d="$1"; shift; for b in "$@"; do [ -x "$d/$b" ] || return 1; done; }
need_go() { command -v go >/dev/null || { echo "setup: Go is needed to build $1" >&2; exit 1; }; }
# the wrapper module must require the version versions.env pins (versions.env is the one place to bump)
check_pin() {  # module-dir module version
  grep -qE "^(require )?[[:space:]]*$2 $3( |$)" "$1/go.mod" || {
    echo "setup: $1/go.mod does not require $2 $3 (versions.env); bump it there and run go mod tidy" >&2; exit 1; }
}
finish() {  # tmp-dir final-dir started-at what
  rm -rf "$2"; mv "$1" "$2"
  log "built $4 in $(( $(date +%s) - $3 )) s"
}

kube_ldflags() {
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  echo "-s -w \
 -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
}

build_containerd() {
  have_all "$CONTAINERD_DIR" containerd containerd-shim-runc-v2 ctr && return 0
  need_go "containerd $CONTAINERD_VERSION"
  check_pin "$HERE/go/containerd" github.com/containerd/containerd/v2 "$CONTAINERD_VERSION"
  log "building containerd $CONTAINERD_VERSION from Go modules (cold: ~2-4 min on 2 cores)"
  local t0; t0=$(date +%s)
  local tmp="$CONTAINERD_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  local pkg=github.com/containerd/containerd/v2
  (cd "$HERE/go/containerd" && go build -trimpath -buildvcs=false -tags "no_btrfs no_devmapper no_zfs" \
      -ldflags "-s -w -X $pkg/version.Version=$CONTAINERD_VERSION" -o "$tmp/" \
      "$pkg/cmd/containerd" "$pkg/cmd/containerd-shim-runc-v2" "$pkg/cmd/ctr")
  finish "$tmp" "$CONTAINERD_DIR" "$t0" "$("$tmp/containerd" --version)"
}

build_kubernetes_node() {
  have_all "$KNODE_DIR" kubelet kube-scheduler kube-proxy agnhost && return 0
  need_go "the Kubernetes $KUBERNETES_VERSION node binaries"
  log "building kubelet, kube-scheduler, kube-proxy, agnhost $KUBERNETES_VERSION (cold, warm control-plane cache: ~3-6 min)"
  local t0; t0=$(date +%s)
  local tmp="$KNODE_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$HERE/go/kubernetes" && go build -trimpath -buildvcs=false -ldflags "$(kube_ldflags)" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy \
      k8s.io/kubernetes/test/images/agnhost)
  finish "$tmp" "$KNODE_DIR" "$t0" "$("$tmp/kubelet" --version)"
}

build_registry() {
  have_all "$REGISTRY_DIR" registry && return 0
  need_go "registry $REGISTRY_VERSION"
  # distribution has no replace/exclude directive: `go install pkg@version` works (no wrapper module)
  log "building the distribution registry $REGISTRY_VERSION from Go modules (cold: ~1.5-3 min)"
  local t0; t0=$(date +%s)
  local tmp="$REGISTRY_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -buildvcs=false \
      -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
      "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION")
  finish "$tmp" "$REGISTRY_DIR" "$t0" "$("$tmp/registry" --version)"
}

build_coredns() {
  have_all "$COREDNS_DIR" coredns && return 0
  need_go "coredns $COREDNS_VERSION"
  # no replace/exclude directive in CoreDNS's go.mod: `go install pkg@version` works
  log "building CoreDNS $COREDNS_VERSION from Go modules (cold: ~4-6 min)"
  local t0; t0=$(date +%s)
  local tmp="$COREDNS_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -buildvcs=false -ldflags "-s -w" \
      "github.com/coredns/coredns@$COREDNS_VERSION")
  finish "$tmp" "$COREDNS_DIR" "$t0" "$("$tmp/coredns" -version | head -n 1)"
}

build_e2e() {
  [ "${CILIARY_SKIP_E2E_TEST:-0}" = 1 ] && { log "e2e.test skipped (CILIARY_SKIP_E2E_TEST=1)"; return 0; }
  have_all "$E2E_DIR" e2e.test && return 0
  need_go "e2e.test $KUBERNETES_VERSION"
  log "building the upstream e2e.test $KUBERNETES_VERSION (cold: ~3-8 min)"
  local t0; t0=$(date +%s)
  local tmp="$E2E_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$HERE/go/kubernetes" && go test -c -trimpath -buildvcs=false -ldflags "$(kube_ldflags)" \
      -o "$tmp/e2e.test" k8s.io/kubernetes/test/e2e)
  finish "$tmp" "$E2E_DIR" "$t0" "e2e.test $KUBERNETES_VERSION"
}

build_skaffold() {
  [ "${CILIARY_SKIP_SKAFFOLD:-0}" = 1 ] && { log "skaffold skipped (CILIARY_SKIP_SKAFFOLD=1)"; return 0; }
  have_all "$SKAFFOLD_DIR" skaffold && return 0
  need_go "skaffold $SKAFFOLD_VERSION"
  check_pin "$HERE/go/skaffold" github.com/GoogleContainerTools/skaffold/v2 "$SKAFFOLD_VERSION"
  log "building skaffold $SKAFFOLD_VERSION from Go modules (cold: ~6-12 min)"
  local t0; t0=$(date +%s)
  local tmp="$SKAFFOLD_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$HERE/go/skaffold" && go build -trimpath -buildvcs=false \
      -ldflags "-s -w -X github.com/GoogleContainerTools/skaffold/v2/pkg/skaffold/version.version=$SKAFFOLD_VERSION" \
      -o "$tmp/skaffold" github.com/GoogleContainerTools/skaffold/v2/cmd/skaffold)
  finish "$tmp" "$SKAFFOLD_DIR" "$t0" "skaffold $("$tmp/skaffold" version)"
}

steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(containerd kubernetes-node registry coredns e2e skaffold)
# one build at a time per cache (its own lock, so a control-plane build elsewhere does not hold it up)
mkdir -p "$CACHE"
exec 8>"$CACHE/.build-node.lock"
flock 8
for s in "${steps[@]}"; do
  case "$s" in
    containerd) build_containerd ;;
    kubernetes-node) build_kubernetes_node ;;
    registry) build_registry ;;
    coredns) build_coredns ;;
    e2e) build_e2e ;;
    skaffold) build_skaffold ;;
    *) echo "setup: unknown build step $s" >&2; exit 2 ;;
  esac
done
