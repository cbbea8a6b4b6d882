# syntax=docker/dockerfile:1
# camlabel, the Label Studio ML backend: gunicorn on :9090 plus its training worker.
# Configuration is by environment variables only (docs/deploy.md lists them).
#
#   CPU (default):  docker build -t camlabel .
#   NVIDIA GPU:     docker build -t camlabel:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 .
#                   docker run --gpus all -p 9090:9090 -v camlabel-models:/data/models camlabel:cuda
#
# torch==2.14.1 from PyPI is a CUDA 13.0 build that brings its own CUDA libraries, so both
# images hold the same wheels; the GPU needs an NVIDIA driver >= 580 and the NVIDIA Container
# Toolkit on the host. The install is scripts/install.sh, the script `make setup` runs in CI.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# The python images have a venv-capable python3; the nvidia/cuda (Ubuntu) ones have none.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 camlabel \
    && useradd --system --no-log-init --create-home --uid 10001 --gid 10001 camlabel \
    && mkdir -p /data/models \
    && chown camlabel:camlabel /data/models

WORKDIR /app
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# torch first, in its own layer: a source change does not download it again. uv (the script's
# INSTALLER=uv, as `make setup`) unpacks torch's 5.5 GB of wheels several times faster than pip.
COPY scripts/install.sh scripts/uv_install.py scripts/
RUN INSTALLER=uv UV_NO_CACHE=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    scripts/install.sh --torch-only /opt/venv

COPY . .
RUN INSTALLER=uv UV_NO_CACHE=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    scripts/install.sh /opt/venv \
    && rm -rf build ./*.egg-info

# Defaults of the server (backend/cli.py, backend/settings.py); override with -e or compose.
# Secrets (LABEL_STUDIO_API_KEY, BASIC_AUTH_PASS, WEBHOOK_SECRET) are given at run time only.
ENV MODEL_DIR=/data/models \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=4 \
    TIMEOUT=120 \
    DEVICE=auto \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
VOLUME /data/models
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py"]
CMD ["camlabel", "serve"]
