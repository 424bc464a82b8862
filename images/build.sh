#!/usr/bin/env bash
# Builds kquant's images and pushes them to the local registry: what `make images` runs, and what
# the release workflow runs on public bases (BASE=debian:bookworm-slim, PUSH_PREFIX=ghcr.io/...).
#
#   images/build.sh [cpu|cuda|all|tags|base] [NAME...]   (default: cpu; NAMEs pick images by name)
#
# One version source: the chart's appVersion. Tags (what the chart and the operator default to):
#   ghcr.io/kquant-dev/kquant:<v>          operator
#   ghcr.io/kquant-dev/quantizer:<v>       quantizer, CPU llama.cpp      quantizer:<v>-cuda  CUDA
#   ghcr.io/kquant-dev/llama-server:<v>    llama-server, CPU             llama-server:<v>-cuda  CUDA
# Each is also pushed as $KQUANT_REGISTRY/kquant-dev/<name>:<tag> (default 127.0.0.1:5000); the
# real node's containerd resolves ghcr.io/kquant-dev through that registry, so the chart's own
# references work there unchanged.
#
# Caching: BuildKit's layer cache in dockerd's data root (~/.cache/kquant/docker): a second run with
# nothing changed builds nothing and pushes nothing new. The base image is made once per Debian
# release and reused.
#
# Environment: BASE (skip making the local base), KQUANT_REGISTRY, PUSH (0: build only),
# CUDA_ARCHITECTURES (default 90 here; a release passes "80;86;89;90"), JOBS (llama.cpp build jobs),
# IMAGE_PREFIX (default ghcr.io/kquant-dev).
# Release mode (.github/workflows/release.yml): PLATFORMS=linux/amd64,linux/arm64 builds with
# `docker buildx build` for those platforms and pushes straight to IMAGE_PREFIX, with an SBOM and
# provenance attestation, instead of loading into dockerd and pushing to the local registry.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
what="${1:-cpu}"
names=("${@:2}")

version="$(sed -nE 's/^appVersion:[[:space:]]*"?([^"[:space:]]+)"?.*/\1/p' charts/kquant/Chart.yaml)"
[ -n "$version" ] || { echo "images/build.sh: no appVersion in charts/kquant/Chart.yaml" >&2; exit 1; }
prefix="${IMAGE_PREFIX:-ghcr.io/kquant-dev}"
registry="${KQUANT_REGISTRY:-127.0.0.1:5000}"
suite="${DEBIAN_SUITE:-bookworm}"
quantizer_suite="${QUANTIZER_DEBIAN_SUITE:-trixie}"
cache="${KQUANT_CACHE:-$HOME/.cache/kquant}"

# name  target  dockerfile  tag
cpu_images=("kquant operator images/Dockerfile $version"
            "quantizer quantizer images/Dockerfile $version"
            "llama-server llama-server images/Dockerfile $version")
cuda_images=("llama-server llama-server-cuda images/Dockerfile $version-cuda"
             "quantizer quantizer-cuda images/Dockerfile $version-cuda")

log() { printf '[images %s] %s\n' "$(date +%T)" "$*" >&2; }

if [ "$what" = tags ]; then
  for spec in "${cpu_images[@]}" "${cuda_images[@]}"; do
    read -r name _ _ tag <<<"$spec"
    echo "$prefix/$name:$tag"
  done
  exit 0
fi

platforms="${PLATFORMS:-}"
if [ -z "$platforms" ]; then
  eval "$(bash hack/container-runtime.sh start)"
  # Debian's docker CLI (20.10) drives BuildKit itself; a newer CLI on the PATH would want buildx.
  docker() { /usr/bin/docker "$@"; }
  export DOCKER_BUILDKIT=1
fi

# The base: Debian's minbase made with mmdebstrap from Debian's own packages, imported as an
# image tagged with the release and the day it was made. Reused while it exists.
make_base() {
  local suite="$1" stamp tag tar
  stamp="$cache/docker/base-$suite.tag"
  if [ -f "$stamp" ] && docker image inspect "$(cat "$stamp")" >/dev/null 2>&1; then
    cat "$stamp"; return 0
  fi
  tag="kquant.local/debian:$suite-$(date -u +%Y%m%d)"
  tar="$(mktemp --suffix=.tar)"
  log "making $tag with mmdebstrap (minbase)"
  mmdebstrap --quiet --variant=minbase --mode=root --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Check-Valid-Until "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$tar" >"$cache/docker/mmdebstrap-$suite.log" 2>&1 || { tail -20 "$cache/docker/mmdebstrap-$suite.log" >&2; exit 1; }
  docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tar" "$tag" >/dev/null
  rm -f "$tar"
  echo "$tag" >"$stamp"
  echo "$tag"
}

if [ "$what" = base ]; then make_base "$suite"; make_base "$quantizer_suite"; exit 0; fi
if [ -n "$platforms" ] && [ -z "${BASE:-}" ]; then
  echo "images/build.sh: PLATFORMS (release mode) needs BASE, e.g. debian:bookworm-slim" >&2; exit 2
fi
base="${BASE:-$(make_base "$suite")}"
# The CPU quantizer's base: Debian 13, for its CPU-only python3-torch (images/Dockerfile says why).
# Made only when a build needs it.
quantizer_base="${QUANTIZER_BASE:-}"
# The CA bundle pip trusts on this machine (its TLS proxy's CA included), handed to RUN steps that
# download as a BuildKit secret; a release machine without one builds with the image's own bundle.
cacert="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"

build() {
  local name="$1" target="$2" file="$3" tag="$4" ref
  ref="$prefix/$name:$tag"
  log "building $ref (target $target of $file, base $base)"
  mkdir -p "$cache/docker"
  local start=$SECONDS
  if [ -n "$platforms" ]; then
    local cuda_platforms="${CUDA_PLATFORMS:-linux/amd64}"
    [[ "$target" == *-cuda ]] && platforms_for="$cuda_platforms" || platforms_for="$platforms"
    docker buildx build --platform "$platforms_for" --push --sbom=true --provenance=mode=max \
      -f "$file" --target "$target" --build-arg BASE="$base" --build-arg VERSION="$version" \
      --build-arg QUANTIZER_BASE="${QUANTIZER_BASE:-debian:trixie-slim}" \
      --build-arg REVISION="$revision" --build-arg CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-80;86;89;90}" \
      --build-arg JOBS="${JOBS:-4}" --metadata-file "${METADATA_DIR:-.}/metadata-$name-$tag.json" -t "$ref" .
    log "built and pushed $ref ($platforms_for) in $((SECONDS - start))s"
    return 0
  fi
  # --network host: dockerd runs without a bridge; RUN steps reach the package registries
  # through the host's network. Labels carry the version and revision (REVISION is a build arg
  # used only in the last LABEL, so a new commit does not invalidate any compiled layer).
  local secret=()
  [ -f "$cacert" ] && secret=(--secret "id=cacert,src=$cacert")
  local qbase=()
  if [ "$target" = quantizer ]; then
    [ -n "$quantizer_base" ] || quantizer_base="$(make_base "$quantizer_suite")"
    qbase=(--build-arg QUANTIZER_BASE="$quantizer_base")
  fi
  docker build --network host --progress plain -f "$file" --target "$target" "${secret[@]}" "${qbase[@]}" \
    --build-arg BASE="$base" --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" --build-arg JOBS="${JOBS:-2}" \
    -t "$ref" . >"$cache/docker/build-$name-$tag.log" 2>&1 \
    || { tail -40 "$cache/docker/build-$name-$tag.log" >&2; log "build of $ref failed"; return 1; }
  log "built $ref in $((SECONDS - start))s ($(grep -c '^#[0-9]* CACHED' "$cache/docker/build-$name-$tag.log" || true) steps cached)"
  if [ "${PUSH:-1}" = 1 ]; then
    docker tag "$ref" "$registry/${ref#*/}"
    docker push --quiet "$registry/${ref#*/}" >/dev/null
    log "pushed $registry/${ref#*/}"
  fi
}

case "$what" in
  cpu) set -- "${cpu_images[@]}" ;;
  cuda) set -- "${cuda_images[@]}" ;;
  all) set -- "${cpu_images[@]}" "${cuda_images[@]}" ;;
  *) echo "usage: $0 [cpu|cuda|all|tags|base]" >&2; exit 2 ;;
esac
selected=("$@")
shift $#
for spec in "${selected[@]}"; do
  read -r name _ <<<"$spec"
  if [ "${#names[@]}" -gt 0 ] && [[ " ${names[*]} " != *" $name "* ]]; then continue; fi
  # shellcheck disable=SC2086
  build $spec
done
