"""Credentials reach the trainer and nothing else (issue 12): a job run end to end through the operator
with known credential values, which then appear in no status, event, log line, pod spec or stored file.

Against the emulator by default, a real cluster with KUBEFORGE_E2E_KUBECONFIG (as test_operator_e2e.py)."""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import boto3
import pytest
from support.e2e import PTJ, SECRET, job_pods, operator, phase_is, pretrain

from kubeforge.operator.settings import OperatorSettings

KEY_ID = "AKIAKUBEFORGELEAK0001"
SECRET_KEY = "kubeforge-leak-canary/Zq8+secret-value-never-logged"
TEST_S3_CLIENT_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """conftest's fixture with credential values distinctive enough to search every output for."""
    values = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": s3_endpoint}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


def leaks(where: str, text: str) -> list[str]:
    """Which credential appears in text, as is or base64-encoded (as a Secret's data holds it)."""
    return [f"{name} in {where}" for name, value in (("the key id", KEY_ID), ("the secret key", SECRET_KEY))
            if value in text or base64.b64encode(value.encode()).decode() in text]


def stored_objects(bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3")
    return {entry["Key"]: client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            for entry in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


async def test_credentials_appear_in_no_status_event_log_pod_or_stored_file(
        world: Any, settings: OperatorSettings, kubelet: Any, s3_data: dict[str, str], bucket: str,
        caplog: pytest.LogCaptureFixture) -> None:
    cluster = world
    caplog.set_level(logging.DEBUG)  # every log line of the operator, Kopf and the clients, even debug
    job = pretrain(s3_data, "canary", 20, resources={"gpusPerWorker": 0}, cleanPodPolicy="None")
    async with operator(cluster, settings):
        await cluster.apply(job)
        done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "canary", "Succeeded", "Failed"), 180,
                                      "the job to finish")
        pods = await job_pods(cluster, "canary")
    assert done["phase"] == "Succeeded", done
    # The search can find what it looks for: the Secret holds both values, the pod names the Secret.
    assert len(leaks("the Secret", json.dumps(await cluster.get("Secret", SECRET)))) == 2
    assert pods and all(any(e.get("secretRef", {}).get("name") == SECRET
                            for e in p["spec"]["containers"][0].get("envFrom", [])) for p in pods)
    stored = stored_objects(bucket)
    assert any(key.endswith("export/job.yaml") for key in stored)  # the exported files are among them

    found = leaks("the job (status included)", json.dumps(await cluster.get(PTJ, "canary")))
    found += leaks("events", json.dumps(await cluster.events()))
    found += leaks("pod specs", json.dumps(pods))
    if kubelet is not None:
        assert "step 20/20 loss" in kubelet.all_logs()  # the logs searched are the training's
        found += leaks("trainer logs", kubelet.all_logs())
    # This process's own boto3 (uploading the data, reading the bucket back) logs its signed requests at
    # debug level: those are the test's, not the operator's, which never talks to S3.
    operator_records = [r for r in caplog.records if not r.name.startswith(TEST_S3_CLIENT_LOGGERS)]
    assert any(r.name.startswith("kopf") for r in operator_records)
    found += leaks("operator logs", "\n".join(record.getMessage() for record in operator_records))
    for key, body in stored.items():
        found += leaks(f"s3://{bucket}/{key}", body.decode("latin-1"))
    assert found == []
