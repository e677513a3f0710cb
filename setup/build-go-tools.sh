#!/usr/bin/env bash
# Builds the Go-made tools the lab and the tests run (kube-apiserver,
# kube-controller-manager, kubectl, etcd, etcdctl, helm) from Go modules, and caches
# them outside the repository, keyed by version:
#   $CILIARY_CACHE/bin/kubernetes-<ver>/   $CILIARY_CACHE/bin/etcd-<ver>/   $CILIARY_CACHE/bin/helm-<ver>/
#   $CILIARY_CACHE/bin/cyclonus-<ver>/     (the NetworkPolicy reference the differential test runs)
# A second run finds the binaries and returns at once.
#
# CILIARY_RELEASE_BINARIES=/dir makes the set-up copy official release binaries
# from that directory instead of building them (they must report the pinned versions).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/versions.env"
CACHE="${CILIARY_CACHE:-/var/cache/ciliary}"
KUBE_DIR="$CACHE/bin/kubernetes-$KUBERNETES_VERSION"
ETCD_DIR="$CACHE/bin/etcd-$ETCD_VERSION"
HELM_DIR="$CACHE/bin/helm-$HELM_VERSION"
CYCLONUS_DIR="$CACHE/bin/cyclonus-$CYCLONUS_VERSION"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf '[setup] %s\n' "$*"; }

have_all() { local d="$1"; shift; for b in "$@"; do [ -x "$d/$b" ] || return 1; done; }

from_release() {  # dir binaries...
  local d="$1"; shift
  [ -n "${CILIARY_RELEASE_BINARIES:-}" ] || return 1
  mkdir -p "$d"
  for b in "$@"; do install -m 0755 "$CILIARY_RELEASE_BINARIES/$b" "$d/$b"; done
  log "copied $* from $CILIARY_RELEASE_BINARIES"
}

build_kubernetes() {
  have_all "$KUBE_DIR" kube-apiserver kube-controller-manager kubectl && return 0
  from_release "$KUBE_DIR" kube-apiserver kube-controller-manager kubectl && return 0
  command -v go >/dev/null || { echo "setup: Go is needed to build Kubernetes $KUBERNETES_VERSION" >&2; exit 1; }
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  log "building Kubernetes $KUBERNETES_VERSION from Go modules (cold: 15-30 min on 2 cores)"
  local tmp="$KUBE_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$HERE/go/kubernetes" && go build -p "$(nproc)" -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$KUBE_DIR"; mv "$tmp" "$KUBE_DIR"
  log "built $("$KUBE_DIR/kube-apiserver" --version)"
}

build_etcd() {
  have_all "$ETCD_DIR" etcd etcdctl && return 0
  from_release "$ETCD_DIR" etcd etcdctl && return 0
  command -v go >/dev/null || { echo "setup: Go is needed to build etcd $ETCD_VERSION" >&2; exit 1; }
  log "building etcd $ETCD_VERSION from Go modules"
  local tmp="$ETCD_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$HERE/go/etcd" && go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 \
     && go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/etcdctl" go.etcd.io/etcd/etcdctl/v3)
  rm -rf "$ETCD_DIR"; mv "$tmp" "$ETCD_DIR"
  log "built $("$ETCD_DIR/etcd" --version | head -1)"
}

build_helm() {
  have_all "$HELM_DIR" helm && return 0
  from_release "$HELM_DIR" helm && return 0
  command -v go >/dev/null || { echo "setup: Go is needed to build helm $HELM_VERSION" >&2; exit 1; }
  # helm.sh/helm/v3 has no replace directive, so `go install pkg@version` works (no wrapper module);
  # GOFLAGS=-mod=mod is meaningless outside a module and is dropped for this one command.
  log "building helm $HELM_VERSION from Go modules (cold: 3-6 min on 2 cores)"
  local tmp="$HELM_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -buildvcs=false \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  rm -rf "$HELM_DIR"; mv "$tmp" "$HELM_DIR"
  log "built helm $("$HELM_DIR/helm" version --short)"
}

build_cyclonus() {
  have_all "$CYCLONUS_DIR" cyclonus && return 0
  command -v go >/dev/null || { echo "setup: Go is needed to build cyclonus $CYCLONUS_VERSION" >&2; exit 1; }
  # no replace directive in its go.mod, so `go install pkg@version` works, as for helm
  log "building cyclonus $CYCLONUS_VERSION from Go modules (cold: 3-7 min on 2 cores)"
  local tmp="$CYCLONUS_DIR.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -buildvcs=false -ldflags "-s -w" \
      "github.com/mattfenwick/cyclonus/cmd/cyclonus@$CYCLONUS_VERSION")
  rm -rf "$CYCLONUS_DIR"; mv "$tmp" "$CYCLONUS_DIR"
  log "built cyclonus $CYCLONUS_VERSION"
}

# one build at a time per cache (two set-ups started together wait for each other)
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
build_etcd
build_kubernetes
build_helm
build_cyclonus
