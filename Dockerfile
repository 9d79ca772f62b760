# syntax=docker/dockerfile:1
# pixelstream: one image for gateways (`pixelstream serve`) and workers (`pixelstream worker`).
#
#   docker build -t pixelstream .
#   docker run --rm -p 8000:8000 pixelstream                  # embedded: one container, no Redis
#   docker run --rm pixelstream worker --redis-url redis://...  # a stream worker
#
# Two stages: the builder has pip and its caches, the runtime only the virtualenv and the
# prepared model. Both stages use the same base image, so the virtualenv's interpreter path
# (/usr/local/bin/python3.11) is the same in both.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# The CPU wheel index: there is no local torch wheel in a container, and PyPI's default
# torch for Linux is the multi-gigabyte CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /src

# The README's and CI's install entry point, scripts/install.sh, with its container switches
# (tests/test_deploy.py keeps the two from drifting apart). First torch, pinned in
# install.sh, from the CPU index, and the model weights: the largest layer, rebuilt only
# when install.sh changes, not on every source change.
COPY scripts/install.sh scripts/install.sh
RUN PIXELSTREAM_VENV=/opt/venv PIXELSTREAM_DEPS_ONLY=1 PIXELSTREAM_TORCH_INDEX="$TORCH_INDEX" \
    scripts/install.sh

# Then the project itself: a copy in the virtualenv (not editable: /src stays behind).
# torch is already there, so install.sh does not touch it again.
COPY . .
RUN PIXELSTREAM_VENV=/opt/venv PIXELSTREAM_EDITABLE=0 PIXELSTREAM_TORCH_INDEX="$TORCH_INDEX" \
    scripts/install.sh

# The default model's folder, built now so that a container never builds (or downloads)
# anything when it starts. PIXELSTREAM_MODEL_DIR below names its parent.
RUN /opt/venv/bin/pixelstream model prepare --dir /opt/models/mobilenet_v2-imagenet


FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pixelstream
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/models /opt/models

# Spool files (upload buffers of the embedded mode, memory-mapped files the workers read by
# path) go to /tmp, not /dev/shm. Docker's default /dev/shm is 64 MB and the automatic choice
# wants room for four maximal uploads (1 GiB), so it would pick the temp dir anyway; naming
# it keeps the behaviour the same whatever --shm-size a host uses. On a disk the mapped pages
# can be written back and reclaimed under memory pressure; on tmpfs every received byte stays
# in the container's RAM. For /dev/shm instead (a little faster, sized by you):
#   docker run --shm-size=2g -e PIXELSTREAM_SPOOL_DIR=/dev/shm ...
# With PIXELSTREAM_REDIS_URL set, uploads live in Redis and nothing is spooled.
# /tmp is also all the app writes to (with /dev/shm's multiprocessing semaphores), so the
# root filesystem can be mounted read-only (deploy/k8s does).
ENV PATH=/opt/venv/bin:$PATH \
    PIXELSTREAM_MODEL_DIR=/opt/models \
    PIXELSTREAM_HOST=0.0.0.0 \
    PIXELSTREAM_SPOOL_DIR=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/pixelstream
EXPOSE 8000

# Liveness of `serve` (slim has no curl). A worker container has no HTTP port: compose and
# Kubernetes turn this check off for workers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PIXELSTREAM_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["pixelstream"]
CMD ["serve"]
