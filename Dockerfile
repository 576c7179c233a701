# syntax=docker/dockerfile:1.7
# Targets: `operator` (no torch), `trainer-cpu` (CPU torch), `trainer` (CUDA torch).
#   docker build --target operator    -t kubeforge-operator .
#   docker build --target trainer-cpu -t kubeforge-trainer:cpu .
#   docker build --target trainer     -t kubeforge-trainer:cuda .

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# Build the wheel once; no build tools reach the final stages.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubeforge kubeforge
COPY operator operator
COPY trainer trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubeforge-operator" \
      org.opencontainers.image.description="kubeforge operator: PretrainJob and FinetuneJob controller"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home kubeforge
USER 10001
ENTRYPOINT ["kubeforge"]
CMD ["operator"]

FROM ${PYTHON_IMAGE} AS trainer-cpu
LABEL org.opencontainers.image.title="kubeforge-trainer-cpu"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.5.1 \
    && pip install --no-cache-dir "$(ls /wheels/*.whl)[trainer]" && rm -rf /wheels \
    && useradd --uid 10001 --create-home kubeforge
USER 10001
WORKDIR /home/kubeforge
ENTRYPOINT ["kubeforge"]
CMD ["train", "--spec", "/etc/kubeforge/job.yaml"]

FROM ${CUDA_IMAGE} AS trainer
LABEL org.opencontainers.image.title="kubeforge-trainer"
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir torch==2.5.1 \
    && python -m pip install --no-cache-dir "$(ls /wheels/*.whl)[trainer]" && rm -rf /wheels \
    && useradd --uid 10001 --create-home kubeforge
USER 10001
WORKDIR /home/kubeforge
ENTRYPOINT ["kubeforge"]
CMD ["train", "--spec", "/etc/kubeforge/job.yaml"]
