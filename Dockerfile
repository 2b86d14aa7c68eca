# One image for every role; the role is the command. Workers on GPU boxes build with
#   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 --build-arg LLAMA_CMAKE_ARGS="-DGGML_CUDA=on"
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
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
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir ".[llamacpp,orchestrator,dashboard]"
ENV TOKENFARM_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["tokenfarm"]
