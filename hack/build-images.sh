#!/usr/bin/env bash
# Build the operator and trainer-cpu images from the Dockerfile, tagged as the chart's kind values
# name them (kubeforge-operator:dev, kubeforge-trainer-cpu:dev). hack/kind-e2e.sh and the real-node
# tests (make test-node) both build through this script.
#
#   hack/build-images.sh           # the Dockerfile's defaults: python:3.11 slim base, PyPI, PyTorch's CPU index
#   hack/build-images.sh --local   # where no registry and no index but this machine's pip are reachable:
#                                  # a Python 3.11 base made with debootstrap from Debian's packages, and
#                                  # every wheel fetched by this machine's pip, served to the build on 127.0.0.1
#   TAG=dev                        # the images' tag (the kind values' tag)
#   SAVE_DIR=DIR                   # also `docker save` each image to DIR/<target>.tar (for load-image.sh)
#   PYTHON=python3                 # the host's Python 3.11, for --local's pip download and wheel server
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-dev}"
PYTHON="${PYTHON:-python3}"
LOCAL_BASE="kubeforge.local/python:3.11-bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELHOUSE="build/wheelhouse"
build_args=()

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A Python 3.11 image from Debian bookworm's own packages (its python3 is 3.11), made once.
local_base() {
  if docker image inspect "${LOCAL_BASE}" >/dev/null 2>&1; then
    echo "${LOCAL_BASE} exists"
    return
  fi
  command -v debootstrap >/dev/null || fail "--local needs debootstrap (apt-get install debootstrap)"
  local root
  root="$(mktemp -d)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "${root}" "${DEBIAN_MIRROR}" >"${root}.log" 2>&1 || { tail -20 "${root}.log" >&2; fail "debootstrap failed"; }
  rm -rf "${root}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/*
  tar -C "${root}" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "${LOCAL_BASE}" >/dev/null
  rm -rf "${root}" "${root}.log"
}

if [[ "${1:-}" == "--local" ]]; then
  command -v "${PYTHON}" >/dev/null || fail "--local needs ${PYTHON} (Python 3.11) on this machine"
  step "the Python 3.11 base image ${LOCAL_BASE} (debootstrap, Debian's packages)"
  local_base
  step "the wheels, fetched by this machine's pip into ${WHEELHOUSE}"
  # The CPU torch wheel, pinned as `make` installs it; kubeforge's own dependencies and its build
  # backend. Binary wheels only: the images have no compiler. Fetched again when what they are
  # fetched for changes (pyproject.toml, the Dockerfile's torch).
  torch_version="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)"
  wanted="$(cat pyproject.toml - <<<"torch==${torch_version}" | sha256sum | cut -c1-16)"
  if [[ "$(cat "${WHEELHOUSE}/.fetched-for" 2>/dev/null)" != "${wanted}" ]]; then
    "${PYTHON}" -m pip download --quiet --only-binary=:all: --dest "${WHEELHOUSE}" \
      "torch==${torch_version}" ".[trainer]" "setuptools>=69" wheel 2> >(grep -v "is ignored: it is neither" >&2)
    echo "${wanted}" > "${WHEELHOUSE}/.fetched-for"
  else
    echo "up to date"
  fi
  port="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "${PYTHON}" -m http.server --bind 127.0.0.1 --directory "${WHEELHOUSE}" "${port}" >/dev/null 2>&1 &
  server=$!
  trap 'kill "${server}" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do
    "${PYTHON}" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${port}/')" 2>/dev/null && break
    sleep 0.2
  done
  index="--no-index --find-links http://127.0.0.1:${port}/"
  # The build's containers share this machine's network, so that they reach the wheel server on
  # loopback; the legacy builder, since BuildKit's Dockerfile frontend is an image from a registry.
  export DOCKER_BUILDKIT=0
  build_args=(--network host --build-arg "PYTHON_IMAGE=${LOCAL_BASE}"
              --build-arg "PIP_INDEX_ARGS=${index}" --build-arg "TORCH_INDEX_ARGS=${index}")
elif [[ -n "${1:-}" ]]; then
  fail "usage: hack/build-images.sh [--local]"
fi

for target in operator trainer-cpu; do
  step "image kubeforge-${target}:${TAG}"
  docker build "${build_args[@]}" --target "${target}" -t "kubeforge-${target}:${TAG}" .
  if [[ -n "${SAVE_DIR:-}" ]]; then
    mkdir -p "${SAVE_DIR}"
    docker save "kubeforge-${target}:${TAG}" -o "${SAVE_DIR}/${target}.tar"
  fi
done
