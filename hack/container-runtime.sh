#!/usr/bin/env bash
# The container stack that `make images` and the real node need, from Debian's packages only:
# dockerd (image builds), a docker-registry on loopback (what the real node pulls from) and the
# CNI plugins, and ipset for the NetworkPolicy enforcer (hack/localcluster/netpolicy.py). CI machines are fresh, so this installs what is missing, then starts both daemons
# unless they already answer. No systemd here: the daemons run as background processes whose
# pid, log and data live under ~/.cache/kquant (outside the repo, kept between runs).
#
#   hack/container-runtime.sh start   install if needed, start dockerd + registry, print env
#   hack/container-runtime.sh stop    stop what `start` started
#   hack/container-runtime.sh check   exit 0 when this machine can run containers at all
#
# The printed lines are `export DOCKER_HOST=...` and `export KQUANT_REGISTRY=...`, for `eval`.
set -euo pipefail

cache="${KQUANT_CACHE:-$HOME/.cache/kquant}"
root="$cache/docker"
sock="$root/run/docker.sock"
registry_addr="${KQUANT_REGISTRY:-127.0.0.1:5000}"
packages=(docker.io containernetworking-plugins docker-registry mmdebstrap iptables ipset)

log() { printf '[container-runtime %s] %s\n' "$(date +%T)" "$*" >&2; }

install_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Can this machine run containers? Root, a writable cgroup file system and overlayfs are what
# dockerd and containerd need; a sandbox without them gets a clear "no" instead of a hang.
check() {
  if [ "$(id -u)" != 0 ]; then echo "not root: dockerd and the kubelet need root" >&2; return 1; fi
  if [ ! -w /sys/fs/cgroup ] && [ ! -w /sys/fs/cgroup/memory ]; then
    echo "no writable cgroup file system at /sys/fs/cgroup" >&2; return 1
  fi
  if ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
    echo "the kernel has no overlay file system" >&2; return 1
  fi
  return 0
}

docker_up() { [ -S "$sock" ] && /usr/bin/docker -H "unix://$sock" version >/dev/null 2>&1; }
registry_up() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$registry_addr/v2/', timeout=2)" 2>/dev/null; }

start() {
  check
  install_packages
  mkdir -p "$root/run" "$root/data" "$root/exec" "$cache/registry"
  if ! docker_up; then
    log "starting dockerd (data root $root/data)"
    # No bridge and no iptables: builds use the host network (RUN steps reach the package
    # registries) and nothing here publishes ports; the node's pods get their network from CNI.
    nohup /usr/sbin/dockerd --host "unix://$sock" --data-root "$root/data" --exec-root "$root/exec" \
      --pidfile "$root/run/dockerd.pid" --iptables=false --ip-masq=false --bridge=none \
      --storage-driver overlay2 --exec-opt native.cgroupdriver=cgroupfs \
      --insecure-registry "$registry_addr" >"$root/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker_up && break; sleep 1; done
    docker_up || { tail -20 "$root/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
  fi
  if ! registry_up; then
    log "starting docker-registry on $registry_addr (storage $cache/registry)"
    cat >"$root/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $cache/registry}
  delete: {enabled: true}
http:
  addr: $registry_addr
EOF
    nohup /usr/bin/docker-registry serve "$root/registry.yml" >"$root/registry.log" 2>&1 &
    echo $! >"$root/run/registry.pid"
    for _ in $(seq 30); do registry_up && break; sleep 1; done
    registry_up || { tail -20 "$root/registry.log" >&2; log "registry did not start"; exit 1; }
  fi
  echo "export DOCKER_HOST=unix://$sock"
  echo "export KQUANT_REGISTRY=$registry_addr"
}

stop() {
  local f pid
  for f in "$root/run/registry.pid" "$root/run/dockerd.pid"; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$f"
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  check) check ;;
  *) echo "usage: $0 start|stop|check" >&2; exit 2 ;;
esac
