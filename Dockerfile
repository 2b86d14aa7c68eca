# One image for every role; the role is the command. Workers on GPU boxes build the CUDA engine as
# the GPU check did (tests/gpu/device_check.sh: -DGGML_CUDA=ON for the card's architectures only):
#   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 --build-arg LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON"
#   --build-arg CUDA_ARCHITECTURES="86;89" --build-arg EXTRAS=llamacpp,torch
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
# Compute capabilities to build CUDA kernels for (CMAKE_CUDA_ARCHITECTURES); unused without CUDA.
# Each one adds minutes to the build: name only the cards the workers have.
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ARG EXTRAS="llamacpp,orchestrator,dashboard"
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY farm farm
COPY orchestrator orchestrator
COPY worker worker
COPY dashboard dashboard
COPY migrations migrations
COPY examples examples
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS} -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
    pip install --no-cache-dir ".[${EXTRAS}]"
ENV TOKENFARM_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["tokenfarm"]
