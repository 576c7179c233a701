#!/usr/bin/env bash
# Wait for kubeforge jobs as a user watching them would: print each job's phase, reason and step
# progress whenever they change, until every job has Succeeded (exit 0), or one has Failed or the
# time is up (exit 1, after `kubectl describe` of it); then print `kubectl get kubeforge` and each
# job's device, model URI and eval metrics. hack/kind-e2e.sh and the real-node tests both wait with it.
#
#   hack/wait-for-jobs.sh pretrainjob/tiny-shakespeare finetunejob/review-sentiment
#   NAMESPACE=ns              the jobs' namespace (default: the kubectl context's)
#   JOB_TIMEOUT_SECONDS=1800  for all of them together;  POLL_SECONDS=5  between looks
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: hack/wait-for-jobs.sh KIND/NAME..." >&2; exit 2; }
timeout_seconds="${JOB_TIMEOUT_SECONDS:-1800}"
poll_seconds="${POLL_SECONDS:-5}"
namespace=(${NAMESPACE:+--namespace "${NAMESPACE}"})
deadline=$(( $(date +%s) + timeout_seconds ))

wait_for_job() {
  local resource="$1" phase last=""
  while (( $(date +%s) < deadline )); do
    phase="$(kubectl "${namespace[@]}" get "${resource}" -o jsonpath='{.status.phase}/{.status.reason}/{.status.stepProgress}')"
    if [[ "${phase}" != "${last}" ]]; then
      echo "${resource}: ${phase}"
      last="${phase}"
    fi
    case "${phase}" in
      Succeeded/*) return 0 ;;
      Failed/*) kubectl "${namespace[@]}" describe "${resource}"; return 1 ;;
    esac
    sleep "${poll_seconds}"
  done
  kubectl "${namespace[@]}" describe "${resource}"
  echo "error: ${resource} did not finish within ${timeout_seconds}s" >&2
  return 1
}

for resource in "$@"; do
  wait_for_job "${resource}"
done

printf '\n==> status\n'
kubectl "${namespace[@]}" get kubeforge
for resource in "$@"; do
  echo
  echo "${resource}:"
  kubectl "${namespace[@]}" get "${resource}" \
    -o jsonpath='  device: {.status.device}{"\n"}  model: {.status.exportUri}{"\n"}  eval: {.status.evalMetrics}{"\n"}'
done
