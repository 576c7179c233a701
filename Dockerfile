# syntax=docker/dockerfile:1.7
# Three images, from the repository root (tests/packaging/test_dockerfile.py checks what it can without an engine):
#   docker build --target operator    -t kubeforge-operator:0.1.0    .   # no torch: small, starts fast
#   docker build --target trainer-cpu -t kubeforge-trainer-cpu:0.1.0 .   # CPU torch: CPU fallback, kind
#   docker build --target trainer     -t kubeforge-trainer:0.1.0     .   # CUDA torch: GPU nodes
# Each installs into /opt/venv in a build stage; the final stage copies the venv and nothing else.

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
# The torch wheels carry their own CUDA libraries: the base gives the NVIDIA runtime's environment.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-base-ubuntu22.04
ARG TORCH_VERSION=2.13.0
ARG VERSION=0.1.0
# Where pip finds packages: PyPI, and the CPU torch wheel on PyTorch's CPU index. Where neither is
# reachable, pip options naming what is, e.g. "--no-index --find-links http://127.0.0.1:PORT/" with
# `docker build --network host` (hack/build-images.sh --local does that with a base made by debootstrap).
ARG PIP_INDEX_ARGS=""
ARG TORCH_INDEX_ARGS="--index-url https://download.pytorch.org/whl/cpu"

# ---- the kubeforge wheel, built once
FROM ${PYTHON_IMAGE} AS wheel
ARG PIP_INDEX_ARGS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubeforge kubeforge
COPY operator operator
COPY trainer trainer
RUN pip wheel --no-cache-dir --no-deps ${PIP_INDEX_ARGS} --wheel-dir /wheels .

# ---- operator: kubeforge without the trainer extra, so no torch
FROM ${PYTHON_IMAGE} AS operator-venv
ARG PIP_INDEX_ARGS
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${PIP_INDEX_ARGS} /wheels/kubeforge-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS operator
ARG VERSION
LABEL org.opencontainers.image.title="kubeforge-operator" \
      org.opencontainers.image.description="kubeforge operator: runs PretrainJobs and FinetuneJobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kubeforge
COPY --from=operator-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["kubeforge"]
CMD ["operator"]

# ---- trainer-cpu: the CPU build of torch, then the trainer extra (which then pulls no CUDA build)
FROM ${PYTHON_IMAGE} AS trainer-cpu-venv
ARG TORCH_VERSION
ARG PIP_INDEX_ARGS
ARG TORCH_INDEX_ARGS
# torch in a layer of its own, before kubeforge's wheel: a change to kubeforge reinstalls no torch.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_ARGS} "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir ${PIP_INDEX_ARGS} "$(ls /wheels/kubeforge-*.whl)[trainer]" \
    && /opt/venv/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS trainer-cpu
ARG VERSION
LABEL org.opencontainers.image.title="kubeforge-trainer-cpu" \
      org.opencontainers.image.description="kubeforge trainer, CPU build of PyTorch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kubeforge
COPY --from=trainer-cpu-venv /opt/venv /opt/venv
# The example data, so that `kubectl apply -f examples/pipeline.yaml` (relative data paths) trains as is.
WORKDIR /opt/kubeforge
COPY examples/data examples/data
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HOME=/tmp/huggingface
USER 10001:10001
ENTRYPOINT ["kubeforge"]
# What the operator's pods run (they set the whole command line; see docs/pod-contract.md).
CMD ["train", "--spec-env", "KUBEFORGE_JOB"]

# ---- trainer: CUDA torch from PyPI on the CUDA base, with the distribution's Python 3.11
FROM ${CUDA_IMAGE} AS trainer-venv
ARG TORCH_VERSION
ARG PIP_INDEX_ARGS
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${PIP_INDEX_ARGS} "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir ${PIP_INDEX_ARGS} "$(ls /wheels/kubeforge-*.whl)[trainer]" \
    && /opt/venv/bin/pip uninstall --yes pip

FROM ${CUDA_IMAGE} AS trainer
ARG VERSION
LABEL org.opencontainers.image.title="kubeforge-trainer" \
      org.opencontainers.image.description="kubeforge trainer, CUDA build of PyTorch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The interpreter the venv links to; no venv module, no pip, no compilers.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kubeforge
COPY --from=trainer-venv /opt/venv /opt/venv
WORKDIR /opt/kubeforge
COPY examples/data examples/data
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HOME=/tmp/huggingface
USER 10001:10001
ENTRYPOINT ["kubeforge"]
CMD ["train", "--spec-env", "KUBEFORGE_JOB"]
