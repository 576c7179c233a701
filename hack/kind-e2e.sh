#!/usr/bin/env bash
# Try kubeforge on a local kind cluster, no GPU needed: builds the operator and CPU trainer images,
# loads them into kind, installs MinIO as the S3 store, installs the Helm chart, runs
# examples/pipeline.yaml (pretrain, then LoRA finetune, both on CPU by the CPU fallback) and prints
# where the models are. Needs docker, kind, kubectl and helm. See README.md, "Try it on kind".
#
#   hack/kind-e2e.sh                    # create (or reuse) the cluster `kubeforge` and run it all
#   KIND_CLUSTER=dev hack/kind-e2e.sh   # another cluster name
#   kind delete cluster --name kubeforge   # when done
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KIND_CLUSTER:-kubeforge}"
RELEASE_NAMESPACE="kubeforge-system"
JOB_TIMEOUT_SECONDS="${JOB_TIMEOUT_SECONDS:-1800}"
TAG="dev"  # the tags of charts/kubeforge/ci/kind-cpu-values.yaml

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (README.md, Try it on kind, lists what is needed)"
done

step "kind cluster ${CLUSTER}"
if kind get clusters | grep -qx "${CLUSTER}"; then
  echo "reusing it"
else
  kind create cluster --name "${CLUSTER}" --wait 180s
fi
kubectl config use-context "kind-${CLUSTER}"

step "building the images (the first build downloads torch: several minutes)"
TAG="${TAG}" hack/build-images.sh
kind load docker-image --name "${CLUSTER}" "kubeforge-operator:${TAG}" "kubeforge-trainer-cpu:${TAG}"

step "MinIO, the S3 credentials Secret, the bucket and the example data"
kubectl apply -f examples/kubectl/s3-secret.yaml
kubectl delete job kubeforge-s3-setup --ignore-not-found
kubectl apply -f hack/kind/minio.yaml
kubectl rollout status deployment/minio --timeout=300s
kubectl wait --for=condition=complete job/kubeforge-s3-setup --timeout=300s

step "the kubeforge chart"
helm upgrade --install kubeforge charts/kubeforge \
  --namespace "${RELEASE_NAMESPACE}" --create-namespace \
  --values charts/kubeforge/ci/kind-cpu-values.yaml --wait --timeout 5m

step "examples/pipeline.yaml"
# Jobs from an earlier run would keep their old status: start over.
kubectl delete -f examples/pipeline.yaml --ignore-not-found --wait
kubectl apply -f examples/pipeline.yaml

JOB_TIMEOUT_SECONDS="${JOB_TIMEOUT_SECONDS}" hack/wait-for-jobs.sh pretrainjob/tiny-shakespeare finetunejob/review-sentiment

cat <<MESSAGE

The models are in the cluster's MinIO (bucket kubeforge). To copy one out:
  kubectl port-forward svc/minio 9000 &
  AWS_ACCESS_KEY_ID=kubeforge AWS_SECRET_ACCESS_KEY=kubeforge-minio-secret \\
    aws --endpoint-url http://localhost:9000 s3 sync <model URI above> ./model
Next: kubectl apply -f examples/kubectl/ (the data is uploaded already); kind delete cluster --name ${CLUSTER}
MESSAGE
