# The default llama-server image: built from the llama.cpp source that the llama-cpp-python
# 0.3.36 sdist vendors (ggml-org/llama.cpp@0c1e57098), the same source the quantizer links and the
# tests run, so the GGUF types a variant uses are the types the server knows.
#   docker build -f hack/images/llama-server.Dockerfile -t ghcr.io/kquant-dev/llama-server:0.3.36-cuda .
ARG CUDA_VERSION=12.6.3
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake g++ python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN pip download --break-system-packages --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d . \
    && tar xzf llama_cpp_python-0.3.36.tar.gz
RUN cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DGGML_CUDA=ON -DGGML_NATIVE=OFF \
      -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DCMAKE_CUDA_ARCHITECTURES="80;86;89;90" \
    && cmake --build build --target llama-server -j"$(nproc)"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/llama-server /usr/local/bin/llama-server
USER 1000:1000
EXPOSE 8080
HEALTHCHECK CMD curl -fs http://localhost:8080/health || exit 1
ENTRYPOINT ["/usr/local/bin/llama-server"]
