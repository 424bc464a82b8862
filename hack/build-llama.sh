#!/usr/bin/env bash
# Builds the llama.cpp tools that kquant's tests and benchmarks run (llama-server, llama-fit-params,
# ggml-rpc-server, llama-completion, llama-cli) from the exact llama.cpp source that the
# llama-cpp-python sdist on PyPI vendors, so the binaries and the in-process library agree on
# every memory rule the offload planner models.
#
# CPU only, with the RPC backend: an rpc-server on loopback shows up to llama.cpp as a second
# device, which is how the planner is measured against llama.cpp without a GPU.
#
# Output (cached outside the repo, never committed):
#   ~/.cache/kquant/llama.cpp/<version>/src   the vendored source tree (convert_hf_to_gguf.py, gguf-py)
#   ~/.cache/kquant/llama.cpp/<version>/bin   the binaries
# A second run builds nothing. The last line printed is the bin directory.
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), KQUANT_CACHE (default ~/.cache/kquant),
# JOBS (default 2: the build machines are shared), PYTHON (default python3.11).
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${KQUANT_CACHE:-$HOME/.cache/kquant}"
jobs="${JOBS:-2}"
python="${PYTHON:-python3.11}"
root="$cache/llama.cpp/$version"
src="$root/src"
bin="$root/bin"
build="$root/build"
targets=(llama-server llama-fit-params ggml-rpc-server llama-completion llama-cli llama-quantize llama-imatrix llama-perplexity llama-gguf-split)
# ggml-rpc-server is also installed as rpc-server, the name older llama.cpp docs use.
wanted=(llama-server llama-fit-params rpc-server ggml-rpc-server llama-completion llama-cli llama-quantize llama-imatrix llama-perplexity llama-gguf-split)

all_built() {
  local t
  for t in "${wanted[@]}"; do
    [ -x "$bin/$t" ] || return 1
  done
  [ -f "$src/CMakeLists.txt" ]
}

if all_built; then
  echo "$bin"
  exit 0
fi

mkdir -p "$root"

# 1. The vendored source, from the sdist (pip picks the sdist because of --no-binary).
if [ ! -f "$src/CMakeLists.txt" ]; then
  dl="$root/download"
  rm -rf "$dl"
  mkdir -p "$dl"
  "$python" -m pip download --quiet --no-deps --no-binary :all: \
    --dest "$dl" "llama-cpp-python==$version" >&2
  sdist="$(ls "$dl"/llama_cpp_python-"$version".tar.gz)"
  tmp="$root/extract"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  tar -xzf "$sdist" -C "$tmp"
  rm -rf "$src"
  mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$src"
  rm -rf "$tmp" "$dl"
fi

# 2. Configure and build. GGML_NATIVE=OFF keeps the binaries portable between the shared machines.
generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
cmake -S "$src" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF \
  -DGGML_RPC=ON \
  -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$build" --config Release -j "$jobs" --target "${targets[@]}" >&2

# 3. Install the binaries into bin/ (copied, so a later rebuild in build/ never half-replaces them).
mkdir -p "$bin"
for t in "${targets[@]}"; do
  cp -f "$build/bin/$t" "$bin/$t"
done
ln -sf ggml-rpc-server "$bin/rpc-server"

all_built
echo "$bin"
