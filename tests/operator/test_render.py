"""`kubeforge render`: what the operator would create for a job, from the operator's own builders,
and accepted by a real API server with the gang schedulers' CRDs installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.jobs import ROOT, example, write_manifest
from support.processes import free_port, run_cli

UPSTREAM_CRDS = ROOT / "tests" / "crds" / "upstream"


def gpu_job(**spec: Any) -> dict[str, Any]:
    job = example("kubectl/pretrain.yaml")[0]
    job["metadata"]["namespace"] = "ml-research"
    job["spec"]["resources"] = {"workers": 2, "gpusPerWorker": 4, "cpu": "16", "memory": "64Gi"}
    job["spec"]["podTemplate"] = {
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml-training", "effect": "NoSchedule"}]}
    job["spec"]["gang"] = {"queueName": "team-a"}
    job["spec"].update(spec)
    return job


def render(tmp_path: Path, *jobs: dict[str, Any], flags: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    manifest = write_manifest(tmp_path / "job.yaml", *jobs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEFORGE_")}
    done = run_cli("render", str(manifest), *flags, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_render_shows_a_process_per_gpu_the_tolerations_and_the_kueue_labels(tmp_path: Path) -> None:
    objects = render(tmp_path, gpu_job(), flags=("--trainer-image", "registry.example.com/trainer:1"))
    assert [o["kind"] for o in objects] == ["Service", "Pod", "Pod"]
    for rank, pod in enumerate(objects[1:]):
        container = pod["spec"]["containers"][0]
        assert container["image"] == "registry.example.com/trainer:1"
        assert container["command"][container["command"].index("--processes") + 1] == "4"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["NODE_RANK"], env["WORLD_SIZE"]) == (str(rank), "8")
        assert {"key": "dedicated", "operator": "Equal", "value": "ml-training", "effect": "NoSchedule"} \
            in pod["spec"]["tolerations"]
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "shakespeare-gpt2-ptj-a0"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert "ownerReferences" not in pod["metadata"]  # the job is not applied yet: no uid to own them


def test_render_takes_operator_defaults_from_the_environment_or_flags(tmp_path: Path) -> None:
    job = gpu_job(gang={"podGroup": "volcano"})
    manifest = write_manifest(tmp_path / "job.yaml", job)
    env = {**os.environ, "KUBEFORGE_POD_DEFAULTS": '{"priorityClassName": "batch", "nodeSelector": {"gpu": "h100"}}'}
    objects = [d for d in yaml.safe_load_all(run_cli("render", str(manifest), env=env, timeout=60).stdout) if d]
    assert [o["kind"] for o in objects] == ["Service", "PodGroup", "Pod", "Pod"]
    assert objects[1]["spec"] == {"minMember": 2, "priorityClassName": "batch"}
    assert objects[2]["spec"]["nodeSelector"] == {"gpu": "h100"} and objects[2]["spec"]["schedulerName"] == "volcano"
    flagged = render(tmp_path, job, flags=("--pod-defaults", '{"priorityClassName": "urgent"}', "--cpu-fallback"))
    assert flagged[2]["spec"]["priorityClassName"] == "urgent"
    assert "nvidia.com/gpu" not in flagged[2]["spec"]["containers"][0]["resources"]["limits"]
    bad = run_cli("render", str(manifest), "--gang-defaults", '{"podGroup": "yunikorn"}', timeout=60)
    assert bad.returncode == 2 and "KUBEFORGE_GANG_DEFAULTS: podGroup: must be one of" in bad.stderr


# ---------------------------------------------------------------------------------------------------
# A real API server (../shared/realk8s next to the repository, as CI has it)


def realk8s_dir() -> Path | None:
    for candidate in (os.environ.get("KUBEFORGE_REALK8S"), ROOT.parent / "shared" / "realk8s"):
        if candidate and (Path(candidate) / "up.sh").is_file():
            return Path(candidate)
    return None


class Kubectl:
    def __init__(self, binary: Path, kubeconfig: str):
        self.binary, self.kubeconfig = binary, kubeconfig

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), "--kubeconfig", self.kubeconfig, *args], input=stdin,
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    """An API server of this test's own (no controllers, no scheduler: only admission is tested),
    with kubeforge's CRDs and the gang schedulers' PodGroup CRDs."""
    source = realk8s_dir()
    if source is None:
        pytest.skip("no control plane: ../shared/realk8s is not next to the repository and KUBEFORGE_REALK8S is unset")
    home = tmp_path_factory.mktemp("realk8s")
    env = {**os.environ, "REALK8S_HOME": str(home), "REALK8S_PORT": str(free_port()),
           "REALK8S_ETCD_PORT": str(free_port()), "CONTROLLERS": "0", "SCHEDULER": "0"}
    try:
        started = subprocess.run([str(source / "up.sh")], capture_output=True, text=True, timeout=120, env=env)
        assert started.returncode == 0, started.stderr
        client = Kubectl(home / "bin" / "kubectl", started.stdout.strip().splitlines()[-1])
        for path in [*sorted((ROOT / "crds").glob("*.yaml")), *sorted(UPSTREAM_CRDS.glob("*.yaml"))]:
            applied = client("apply", "--server-side", "-f", str(path))
            assert applied.returncode == 0, applied.stderr
        for crd in ("pretrainjobs.kubeforge.io", "podgroups.scheduling.volcano.sh", "podgroups.scheduling.x-k8s.io"):
            established = client("wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}")
            assert established.returncode == 0, established.stderr
        assert client("create", "namespace", "ml-research").returncode == 0
        # Admission checks that a pod's PriorityClass and RuntimeClass exist.
        cluster_objects = [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                            "metadata": {"name": "training"}, "value": 1000},
                           {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"},
                            "handler": "nvidia"}]
        created = client("apply", "-f", "-", stdin=yaml.safe_dump_all(cluster_objects))
        assert created.returncode == 0, created.stderr
        yield client
    finally:
        subprocess.run([str(source / "down.sh")], capture_output=True, timeout=60, env=env)
        shutil.rmtree(home, ignore_errors=True)


FULL_TEMPLATE = {
    "labels": {"team": "nlp"}, "annotations": {"cost-center": "42"}, "nodeSelector": {"pool": "h100"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 60}],
    "affinity": {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "rack", "operator": "Exists"}]}}]},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"kubeforge.io/job-kind": "ptj"}},
            "topologyKey": "kubernetes.io/hostname"}}]}},
    "priorityClassName": "training", "schedulerName": "my-scheduler", "runtimeClassName": "nvidia",
    "imagePullSecrets": [{"name": "registry"}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
                {"name": "config", "configMap": {"name": "nccl", "optional": True}},
                {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}},
                {"name": "shared", "nfs": {"server": "nfs.example.com", "path": "/exports/data"}}],
    "volumeMounts": [{"name": "cache", "mountPath": "/data", "readOnly": True},
                     {"name": "config", "mountPath": "/etc/nccl"}, {"name": "scratch", "mountPath": "/scratch"},
                     {"name": "shared", "mountPath": "/shared", "subPath": "team"}],
    "shmSize": "16Gi",
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
}


@pytest.mark.parametrize("spec", [
    {},
    {"gang": {"podGroup": "volcano"}},
    {"gang": {"podGroup": "coscheduling", "queueName": "team-a"}},
    {"podTemplate": FULL_TEMPLATE},
], ids=["kueue", "volcano", "coscheduling", "full-template"])
def test_a_real_api_server_accepts_the_job_and_what_render_prints(kubectl: Kubectl, tmp_path: Path,
                                                                  spec: dict[str, Any]) -> None:
    job = gpu_job(**spec)
    admitted = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(job))
    assert admitted.returncode == 0, admitted.stderr
    objects = render(tmp_path, job)
    applied = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(objects))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("(server dry run)") == len(objects), applied.stdout


def test_the_api_server_refuses_a_bad_pod_template(kubectl: Kubectl) -> None:
    job = gpu_job(podTemplate={"volumeMounts": [{"name": "cache", "mountPath": "/data"}]})
    refused = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(job))
    assert refused.returncode != 0
    assert "every volumeMount must name a volume of podTemplate.volumes" in refused.stderr
    job = gpu_job(podTemplate={"volumes": [{"name": "cache"}]})
    refused = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(job))
    assert "set exactly one of persistentVolumeClaim" in refused.stderr
