# syntax=docker/dockerfile:1
#
# instructrec serving image.
#
#   docker build -t instructrec:gpu .                          # GPU (default): CUDA runtime base, CUDA build of torch
#   docker build -t instructrec:cpu --build-arg VARIANT=cpu .  # CPU: python:3.11-slim, CPU build of torch
#
# Build args
#   VARIANT          gpu (default) | cpu
#   CUDA_BASE        base image of the gpu variant. torch 2.13.0's Linux wheel on PyPI is a CUDA 13.0
#                    build (it depends on the cuda-toolkit 13.0.x and nvidia-*-cu13 wheels), so the
#                    default base is CUDA 13.0 too: the host needs an NVIDIA driver >= 580 and the
#                    NVIDIA container toolkit. Change both CUDA_BASE and TORCH_INDEX_URL together.
#   CPU_BASE         base image of the cpu variant
#   TORCH_VERSION    2.13.0 (pinned in pyproject.toml)
#   TORCH_INDEX_URL  where torch comes from. Empty (default) = per variant: cpu -> the PyTorch CPU
#                    wheel index (https://download.pytorch.org/whl/cpu, no CUDA libraries, ~10x
#                    smaller); gpu -> pip's default index (PyPI: the CUDA 13.0 build). For another
#                    CUDA build pass e.g. https://download.pytorch.org/whl/cu128 with a matching CUDA_BASE.
#   MODEL_SRC        a checkpoint directory inside the build context to bake into the image at
#                    /models/model (e.g. artifacts/quickstart/model). Default: a placeholder; mount
#                    the model at /models instead (docker run -v /path/to/checkpoint:/models/model:ro).
#
# Runtime: `instructrec serve --host 0.0.0.0`, configured by INSTRUCTREC_* variables
# (instructrec/service/settings.py); INSTRUCTREC_MODEL=/models/model and INSTRUCTREC_PORT=8000 are set here.

ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu22.04
ARG CPU_BASE=python:3.11-slim-bookworm

# --- the two Python 3.11 bases; both stages below start from the chosen one so that the
# --- virtualenv built in `build` finds the same interpreter at the same path in `runtime`.
FROM ${CUDA_BASE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
# python3.11 is in Ubuntu 22.04's universe (jammy-updates); the system python3 there is 3.10.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHON=/usr/bin/python3.11 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${CPU_BASE} AS base-cpu
ENV PYTHON=/usr/local/bin/python3.11

# --- build: a virtualenv with torch, then the package with the `service` extra ---------------
# (base-${VARIANT} is one of the stages above, not an image: hadolint's DL3006 does not apply)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3013
RUN "$PYTHON" -m venv /opt/venv && /opt/venv/bin/python -m pip install --upgrade "pip>=24"
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index for this variant, so the package's `torch==2.13.0` pin is
# already satisfied and no other index is consulted for it. (Pinned: TORCH_VERSION.)
# hadolint ignore=DL3013
RUN url="$TORCH_INDEX_URL"; \
    if [ -z "$url" ] && [ "$VARIANT" = cpu ]; then url=https://download.pytorch.org/whl/cpu; fi; \
    echo "torch==$TORCH_VERSION from ${url:-the default index}"; \
    pip install ${url:+--index-url "$url"} "torch==$TORCH_VERSION"
WORKDIR /src
COPY pyproject.toml README.md ./
# The core and the service only: no training or bench code in the serving image (their
# `instructrec` subcommands are simply not registered here; .dockerignore leaves out
# instructrec/training and instructrec/bench).
COPY instructrec ./instructrec
# The package pins its dependencies in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[service]" \
 && python -c "import torch, instructrec, instructrec.service.app; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && python -c "import importlib.util as u; assert u.find_spec('instructrec.training') is None and u.find_spec('instructrec.bench') is None" \
 && instructrec serve --help >/dev/null

# --- runtime ------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG MODEL_SRC=deploy/docker/model-placeholder
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
 && mkdir -p /models \
 && chown app:app /models
COPY --from=build /opt/venv /opt/venv
COPY --chown=10001:10001 ${MODEL_SRC} /models/model
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/app/.cache/huggingface \
    INSTRUCTREC_MODEL=/models/model \
    INSTRUCTREC_PORT=8000
LABEL org.opencontainers.image.title="instructrec" \
      org.opencontainers.image.description="instructrec /rerank service (${VARIANT})"
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000
# Liveness: /health answers 200 from the first moment and 503 only if the model failed to
# load (readiness, /ready, is for load balancers and Kubernetes). No curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('INSTRUCTREC_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["instructrec", "serve", "--host", "0.0.0.0"]
