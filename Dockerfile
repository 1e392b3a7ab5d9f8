# syntax=docker/dockerfile:1.7
#
# MPO server image. Two runtimes share one recipe:
#
#   docker build -t mpo-server:0.1.0 .                                # CUDA (default)
#   docker build -t mpo-server:0.1.0-cpu --build-arg RUNTIME=cpu .    # CPU, demo family baked in
#
# Every replica holds the whole policy family (mixing needs all K policies in one
# process), so the image carries PyTorch and the server; the models themselves come at run
# time from the Hugging Face cache volume (HF_HOME) or from folders named in MPO_CONFIG.

# Which base the final stage starts from: "cuda" or "cpu".
ARG RUNTIME=cuda
# The CUDA base ships torch in /opt/conda; pip is kept from replacing it (see below).
ARG CUDA_BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
ARG CPU_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# CPU base: slim Python plus the CPU build of torch. Without the CPU index pip would pull
# the multi-GB CUDA build from PyPI.
FROM ${CPU_BASE} AS base-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The same range as pyproject.toml.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.14"

# ---------------------------------------------------------------------------------------
# CUDA base: the official PyTorch runtime image (CUDA and cuDNN libraries, torch built
# against them).
FROM ${CUDA_BASE} AS base-cuda
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---------------------------------------------------------------------------------------
# The server, on whichever base RUNTIME names. DL3006 (untagged image) does not apply:
# base-${RUNTIME} is one of the two stages above, not an image from a registry.
# hadolint ignore=DL3006
FROM base-${RUNTIME} AS server
ARG RUNTIME
# Bake the demo family into the image: "auto" does it for the CPU runtime only, where the
# demo is what the image serves without a config (building it takes ~2 min at first start
# otherwise). "1" or "0" forces it on or off.
ARG BUILD_DEMO=auto

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPO_HOST=0.0.0.0 \
    MPO_PORT=8000 \
    MPO_HOME=/var/lib/mpo \
    MPO_DATA_DIR=/var/lib/mpo/data \
    HF_HOME=/var/cache/huggingface

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it and volume ownership
# (fsGroup) matches.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/mpo \
        --shell /usr/sbin/nologin mpo \
    && mkdir -p "${MPO_HOME}" "${MPO_DATA_DIR}" "${HF_HOME}" /etc/mpo \
    && chown -R mpo:mpo "${MPO_HOME}" "${HF_HOME}"

# Pin the torch that the base carries, so that no dependency resolution can swap it for a
# different build (on the CUDA base that would download a second, mismatched CUDA torch).
RUN python -c "import torch; print('torch==' + torch.__version__)" > /etc/mpo/constraints.txt

WORKDIR /opt/mpo/src
# .dockerignore lets through only what the package needs (pyproject.toml, README, code).
COPY . .
# The `postgres` extra (psycopg) lets replicas share weight profiles (MPO_STORE_URL).
RUN pip install --no-cache-dir --constraint /etc/mpo/constraints.txt ".[postgres]" \
    && mpo --help > /dev/null

COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/mpo-healthcheck

USER 10001:10001
WORKDIR /home/mpo

# Built before VOLUME is declared: Docker copies the image's content into a new, empty
# named volume on first use, so `docker run -v mpo-home:/var/lib/mpo` starts with it.
RUN if [ "${BUILD_DEMO}" = "1" ] || { [ "${BUILD_DEMO}" = "auto" ] && [ "${RUNTIME}" = "cpu" ]; }; \
    then mpo demo build; fi

VOLUME ["/var/lib/mpo", "/var/cache/huggingface"]
EXPOSE 8000

# Loading K models can take minutes: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --start-interval=5s --retries=3 \
    CMD ["mpo-healthcheck"]

ENTRYPOINT ["mpo", "serve"]
