"""Sizes of kquant's images and what takes the space; optionally the warm `make images` time.

    .venv/bin/python -P bench/images.py [--warm-build] [--markdown]

Reads the images `make images` tagged (images/build.sh tags) from the local dockerd
(hack/container-runtime.sh): each image's size as dockerd stores it (uncompressed) and as the
registry serves it (compressed layers), then, inside each image, the folders that hold most of it.
An image not built yet is listed as missing. ``--warm-build`` first times `images/build.sh cpu`
with nothing changed (every step cached, nothing pushed anew).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"
# Where the space goes, per image kind: folders measured with du inside the image.
FOLDERS = [
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3.11", "/usr/lib/python3.13", "/usr/bin", "/usr/share",
    "/opt/llama/lib", "/opt/llama/bin", "/opt/llama.cpp-src",
]
# Python package folders, listed with their largest packages: the venvs (python 3.11 on Debian 12,
# 3.13 for the CPU quantizer on Debian 13) and Debian's own (the CPU quantizer's torch and numpy).
PACKAGE_FOLDERS = [
    "/opt/kquant/lib/python3.11/site-packages", "/opt/kquant/lib/python3.13/site-packages",
    "/usr/lib/python3/dist-packages",
]
TOP_PACKAGES = 8


def runtime_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "hack/container-runtime.sh"), "start"], check=True,
                         capture_output=True, text=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def compressed_size(registry: str, ref: str) -> int | None:
    """Sum of the layer and config sizes in the registry's manifest (what a node downloads)."""
    repo, _, tag = ref.partition("/")[2].rpartition(":")
    request = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            manifest = json.load(response)
    except OSError:
        return None
    return int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])


def folder_sizes(env: dict[str, str], ref: str) -> list[tuple[str, int]]:
    script = ("for d in " + " ".join(FOLDERS + PACKAGE_FOLDERS) + "; do [ -d $d ] && du -skx $d; done; "
              "for d in " + " ".join(PACKAGE_FOLDERS) + "; do [ -d $d ] && "
              f"du -skx $d/* | sort -rn | head -{TOP_PACKAGES}; done; true")
    done = subprocess.run([DOCKER, "run", "--rm", "--network", "none", "--entrypoint", "bash", ref, "-c", script],
                          env=env, capture_output=True, text=True, check=True)
    rows = []
    for line in done.stdout.splitlines():
        size, path = line.split("\t", 1)
        rows.append((path, int(size) * 1024))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warm-build", action="store_true", help="time images/build.sh cpu first")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    env = runtime_env()
    registry = env.get("KQUANT_REGISTRY", "127.0.0.1:5000")
    if args.warm_build:
        started = time.monotonic()
        subprocess.run(["bash", str(REPO / "images/build.sh"), "cpu"], check=True, env=env)
        print(f"warm `images/build.sh cpu` (nothing changed): {time.monotonic() - started:.1f} s\n")
    tags = subprocess.run(["bash", str(REPO / "images/build.sh"), "tags"], check=True,
                          capture_output=True, text=True).stdout.split()
    sep = "|" if args.markdown else " "
    print(f"{sep} image {sep} size {sep} compressed (registry) {sep}")
    if args.markdown:
        print("|---|---|---|")
    present = []
    for ref in tags:
        inspect = subprocess.run([DOCKER, "image", "inspect", "--format", "{{.Size}}", ref], env=env, check=False,
                                 capture_output=True, text=True)
        if inspect.returncode != 0:
            print(f"{sep} {ref} {sep} missing (not built) {sep} {sep}")
            continue
        present.append(ref)
        packed = compressed_size(registry, ref)
        print(f"{sep} {ref} {sep} {mb(int(inspect.stdout))} {sep} {mb(packed) if packed else 'not pushed'} {sep}")
    for ref in present:
        print(f"\n{ref}: where the space goes")
        for path, size in folder_sizes(env, ref):
            print(f"  {mb(size):>8}  {path}")


if __name__ == "__main__":
    main()
