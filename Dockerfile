# syntax=docker/dockerfile:1
# modelworker on NVIDIA GPUs: `make docker-build` (docker build -t modelworker:latest .).
#
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -v /srv/models:/models:ro modelworker:latest \
#       --preload smollm2=smollm2-135m
#
# One model over 2 GPUs (tensor parallelism; NCCL wants a larger /dev/shm than docker's 64 MB):
#
#   docker run --gpus '"device=0,1"' --shm-size 8g -p 50051:50051 -v /srv/models:/models:ro \
#       modelworker:latest --tensor-parallel-size 2 --preload llama=Llama-3.1-70B-Instruct
#
# Several hosts: deploy/kubernetes-tensor-parallel.yaml (LeaderWorkerSet).
#
# The builder compiles flash-attn once, against the exact torch of the image, for Ampere (sm80, also
# runs on sm86) and Hopper (sm90); the runtime stage installs that wheel and nothing is compiled there.
# torch 2.13.0's Linux wheel on PyPI is built with CUDA 13 (it pulls the nvidia-*-cu13 libraries), so
# the toolkit that compiles flash-attn is CUDA 13 too: nvcc and torch must agree on the major version.
# CUDA 13 needs an NVIDIA driver >= 580 on the host (nvidia-smi's header shows it); with an older
# driver torch sees no GPU. For R550/R570 hosts build the CUDA 12.8 image (driver >= 570):
#   docker build --build-arg CUDA_VERSION=12.8.1 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t modelworker:cu128 .
# (`make docker-build DOCKER_BUILD_ARGS="..."` passes the same). Change CUDA_VERSION, TORCH_VERSION
# and TORCH_INDEX_URL together.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG FLASH_ATTN_VERSION=2.8.3
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.37
ARG TARGETARCH=amd64
# Each nvcc job takes several GiB of RAM; lower it on small build machines.
ARG MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# git: flash-attn's setup.py calls it; python3-dev: headers for the extension. Ubuntu's packages are
# not pinned (their versions leave the archive); the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The pip cache is shared with the runtime stage, so torch is downloaded once.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install pip==25.2 setuptools==80.9.0 wheel==0.45.1 packaging==25.0 ninja==1.11.1.4 psutil==7.0.0 \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# FLASH_ATTN_CUDA_ARCHS is what flash-attn's build reads; TORCH_CUDA_ARCH_LIST covers torch's own
# extension helpers. FORCE_BUILD: never fetch a prebuilt wheel that may not match this torch.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0" \
    FLASH_ATTN_CUDA_ARCHS="80;90" \
    FLASH_ATTENTION_FORCE_BUILD=TRUE
# No pip cache here: pip keys a built wheel by the sdist's URL, not by the torch it was compiled
# against, so after a TORCH_VERSION change a cached flash-attn wheel would not match this torch.
RUN MAX_JOBS="${MAX_JOBS}" pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels \
        "flash-attn==${FLASH_ATTN_VERSION}"

# grpc_health_probe, for exec probes and `docker run` health checks (Kubernetes has native gRPC probes).
RUN curl -fsSL -o /usr/local/bin/grpc_health_probe \
        "https://github.com/grpc-ecosystem/grpc-health-probe/releases/download/${GRPC_HEALTH_PROBE_VERSION}/grpc_health_probe-linux-${TARGETARCH}" \
    && chmod 0755 /usr/local/bin/grpc_health_probe \
    && /usr/local/bin/grpc_health_probe -version

# The project itself (worker/pb is generated and committed, so no protoc here).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY registry ./registry
COPY architectures ./architectures
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch pinned first (same version and index as the builder), then the built wheels: modelworker
# with its GGUF import extra, and flash-attn. The wheels are bind-mounted, so they add no layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install "torch==${TORCH_VERSION}" /wheels/flash_attn-*.whl \
        "$(ls /wheels/modelworker-*.whl)[gguf]" \
    && python -c "import torch, flash_attn, worker; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'flash_attn', flash_attn.__version__)"

COPY --from=builder /usr/local/bin/grpc_health_probe /usr/local/bin/grpc_health_probe

RUN useradd --system --uid 10001 --user-group --home-dir /home/modelworker --create-home modelworker \
    && mkdir -p /models \
    && chown modelworker:modelworker /models
USER 10001:10001
WORKDIR /home/modelworker

# Settings travel as MODELWORKER_* variables (flags given to `docker run` override them).
ENV MODELWORKER_HOST=0.0.0.0 \
    MODELWORKER_PORT=50051 \
    MODELWORKER_METRICS_PORT=9400 \
    MODELWORKER_MODEL_ROOTS=/models \
    MODELWORKER_GRACE_SECONDS=20
EXPOSE 50051 9400
VOLUME ["/models"]

# Ready = the ModelWorker service is SERVING (NOT_SERVING while preloading and draining). With TLS on,
# add -tls flags or override the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m \
    CMD ["sh", "-c", "grpc_health_probe -addr=127.0.0.1:${MODELWORKER_PORT} -service=modelworker.v1.ModelWorker"]

ENTRYPOINT ["modelworker", "serve"]
