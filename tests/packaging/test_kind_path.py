"""The kind path (hack/kind-e2e.sh) needs kind, whose node image no registry here serves: its own
parts are checked here, and the parts it shares run on the real node (tests/node/, `--cluster=node`:
hack/build-images.sh, the chart's kind values, hack/wait-for-jobs.sh). The scripts are
shellcheck-clean, the manifests it applies are valid, the pieces name the same images, Secret, bucket
and endpoint, and its data upload puts what the kubectl examples read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import kubernetes_validate
import pytest
import yaml
from support.jobs import EXAMPLES, ROOT

from kubeforge.spec import load_job_file, parse_job

SCRIPT = ROOT / "hack" / "kind-e2e.sh"
BUILD = ROOT / "hack" / "build-images.sh"
MINIO = ROOT / "hack" / "kind" / "minio.yaml"
KIND_VALUES = yaml.safe_load((ROOT / "charts" / "kubeforge" / "ci" / "kind-cpu-values.yaml").read_text())
SECRET = yaml.safe_load((EXAMPLES / "kubectl" / "s3-secret.yaml").read_text())


def kind_objects() -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in yaml.safe_load_all(MINIO.read_text()) if o}


@pytest.mark.parametrize("script", sorted((ROOT / "hack").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script: Path) -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_shellcheck_finds_problems(tmp_path: Path) -> None:
    """The check above is real: an unquoted expansion is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrm -rf $1/build\n')
    result = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_the_script_uses_files_that_exist() -> None:
    text = SCRIPT.read_text()
    paths = set(re.findall(r"(?:examples|charts|hack)/[\w./-]+\.ya?ml", text))
    assert {"examples/pipeline.yaml", "examples/kubectl/s3-secret.yaml", "hack/kind/minio.yaml",
            "charts/kubeforge/ci/kind-cpu-values.yaml"} <= paths
    for path in paths:
        assert (ROOT / path).is_file(), path
    for script in (SCRIPT, BUILD, ROOT / "hack" / "wait-for-jobs.sh"):
        assert script.stat().st_mode & 0o111, f"{script.name} is executable"
    # It builds and waits through the scripts the real-node tests run.
    assert 'TAG="${TAG}" hack/build-images.sh\n' in text
    assert "hack/wait-for-jobs.sh pretrainjob/tiny-shakespeare finetunejob/review-sentiment" in text
    # Those build the targets the Dockerfile has, with the names and tag the chart's kind values give.
    dockerfile, build = (ROOT / "Dockerfile").read_text(), BUILD.read_text()
    assert 'for target in operator trainer-cpu; do' in build
    assert '--target "${target}" -t "kubeforge-${target}:${TAG}"' in build
    for target, values in (("operator", KIND_VALUES["operator"]["image"]),
                           ("trainer-cpu", KIND_VALUES["trainer"]["cpuImage"])):
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, flags=re.MULTILINE)
        assert values["repository"] == f"kubeforge-{target}"
        assert f'TAG="{values["tag"]}"' in text and f'TAG="${{TAG:-{values["tag"]}}}"' in build
    assert KIND_VALUES["trainer"]["pullPolicy"] == "Never", "kind-loaded images are never pulled"


@pytest.mark.parametrize("kind", ["Deployment", "Service", "Job"])
def test_the_kind_manifests_are_valid(kind: str) -> None:
    kubernetes_validate.validate(kind_objects()[kind], "1.30.0", strict=True)


def test_minio_is_where_the_chart_and_the_secret_say() -> None:
    objects = kind_objects()
    service = objects["Service"]
    assert KIND_VALUES["s3"]["endpoint"] == (
        f"http://{service['metadata']['name']}.default.svc.cluster.local:{service['spec']['ports'][0]['port']}")
    assert KIND_VALUES["s3"]["credentialsSecret"] == SECRET["metadata"]["name"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in
           objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ROOT_USER"] == {"name": SECRET["metadata"]["name"], "key": "AWS_ACCESS_KEY_ID"}
    assert env["MINIO_ROOT_PASSWORD"] == {"name": SECRET["metadata"]["name"], "key": "AWS_SECRET_ACCESS_KEY"}
    assert len(SECRET["stringData"]["AWS_SECRET_ACCESS_KEY"]) >= 8, "MinIO refuses shorter root passwords"
    setup = objects["Job"]["spec"]["template"]["spec"]["containers"][0]
    cpu_image = KIND_VALUES["trainer"]["cpuImage"]
    assert setup["image"] == f"{cpu_image['repository']}:{cpu_image['tag']}"


def test_the_pipeline_runs_on_a_kind_node() -> None:
    """No GPU, a laptop's memory: CPU fallback and small requests."""
    for job in load_job_file(str(EXAMPLES / "pipeline.yaml")):
        resources = job.spec.resources
        assert resources.allow_cpu_fallback and KIND_VALUES["trainer"]["cpuFallback"]
        assert resources.memory.endswith("Gi") and int(resources.memory[:-2]) <= 4
        assert float(resources.cpu) <= 2
        # The data paths are relative: the trainer image's working directory holds examples/data.
        assert job.spec.data.train.uri.startswith("examples/data/")


def test_the_setup_job_uploads_the_data_the_kubectl_examples_read(s3_env: dict[str, str]) -> None:
    setup = kind_objects()["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert setup["command"][:2] == ["python", "-c"]
    bucket = KIND_VALUES["s3"]["bucket"]
    for _ in range(2):  # a re-run of the script finds the bucket there
        result = subprocess.run([sys.executable, "-c", setup["command"][2]], cwd=ROOT, env=s3_env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    read = []
    for manifest in sorted((EXAMPLES / "kubectl").glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            if document["apiVersion"].startswith("kubeforge.io/"):
                data = parse_job(document).spec.data
                read += [source.uri for source in (data.train, data.eval) if source]
    assert read
    for uri in read:
        assert uri.startswith(f"s3://{bucket}/") and uri.removeprefix(f"s3://{bucket}/") in keys, uri


def test_the_readme_tells_how_to_run_it() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it on kind", 1)[1].split("\n## ", 1)[0]
    assert "hack/kind-e2e.sh" in section and "kind delete cluster --name kubeforge" in section
    assert 'CLUSTER="${KIND_CLUSTER:-kubeforge}"' in SCRIPT.read_text()
