"""The README's kind path on the real node: the chart with its kind values, then `kubectl apply -f
examples/pipeline.yaml`, exactly as a user types it. Both jobs succeed on CPU, in containers of
kubeforge's own trainer image run by containerd, their progress in `kubectl get kubeforge` while
they run, and the models in S3."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import pytest
from k8s.cluster import Cluster
from support.e2e import FTJ, PTJ, condition, status
from support.jobs import ROOT
from support.node import IMAGES, NODE_NAME, Node, kubectl_example, s3_client

pytestmark = pytest.mark.node

JOBS = ((PTJ, "tiny-shakespeare", "ptj"), (FTJ, "review-sentiment", "ftj"))
async def wait_as_the_kind_path_does(cluster: Cluster, node: Node, timeout: float) -> dict[str, Any]:
    """hack/wait-for-jobs.sh on both jobs, as hack/kind-e2e.sh waits, while the pods and `kubectl get
    kubeforge` are looked at each second, as a user watching would: what was seen on the way."""
    env = {**os.environ, "PATH": f"{node.kubectl_path.parent}:{os.environ['PATH']}", "KUBECONFIG": node.kubeconfig,
           "NAMESPACE": cluster.namespace, "POLL_SECONDS": "1", "JOB_TIMEOUT_SECONDS": str(int(timeout))}
    waiting = await asyncio.create_subprocess_exec(
        str(ROOT / "hack" / "wait-for-jobs.sh"), *(f"{kind.lower()}/{name}" for kind, name, _ in JOBS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    output = asyncio.create_task(waiting.communicate())
    seen: dict[str, Any] = {"containers": {}, "get_lines": []}
    while not output.done():
        for pod in await cluster.list_pods("app.kubernetes.io/managed-by=kubeforge"):
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                if container.get("containerID"):
                    seen["containers"][pod["metadata"]["name"]] = (
                        pod["spec"].get("nodeName"), container["containerID"], container["image"])
        listing = node.kubectl("-n", cluster.namespace, "get", "kubeforge", check=False).stdout
        seen["get_lines"] += [line for line in listing.splitlines() if re.search(r"\s\d+/\d+\s", line)]
        await asyncio.wait([output], timeout=1)
    seen["waited"] = (waiting.returncode, output.result()[0].decode())
    return seen


def progress_while_running(lines: list[str], name: str) -> list[int]:
    """The steps short of the end that a listing line of the job showed: progress while it ran."""
    return [int(m[1]) for line in lines if line.split()[0].endswith(f"/{name}")
            and (m := re.search(r"\s(\d+)/(\d+)\s", line)) and 0 < int(m[1]) < int(m[2])]


async def test_the_example_pipeline_runs_in_containers_of_the_real_node(node_cluster: Cluster, node: Node) -> None:
    cluster = node_cluster
    started = time.monotonic()
    kubectl_example(node, cluster.namespace)
    seen = await wait_as_the_kind_path_does(cluster, node, timeout=1200)
    took = time.monotonic() - started
    code, waited = seen["waited"]
    assert code == 0, f"{waited}\n{await cluster.describe()}\n{node.operator_log()}"

    # Each pod ran as a container of containerd on the node, from the trainer image built here.
    assert {pod.rsplit("-w", 1)[0] for pod in seen["containers"]} == {"tiny-shakespeare-ptj", "review-sentiment-ftj"}
    for pod, (node_name, container_id, image) in seen["containers"].items():
        assert node_name == NODE_NAME and container_id.startswith("containerd://"), (pod, node_name, container_id)
        assert image.endswith(IMAGES["trainer-cpu"]), (pod, image)

    s3 = s3_client(node)
    for kind, name, _ in JOBS:
        final = await status(cluster, kind, name)
        assert final["stepProgress"] == "300/300" and final["device"] == "cpu", final
        assert condition(final, "CPUFallback")["status"] == "True"
        # Progress reached status while the job ran, not only at the end: in the wait's lines and
        # in `kubectl get kubeforge`.
        running = rf"^{kind.lower()}/{name}: Running/[^/]*/([1-9]\d?|[12]\d\d)/300$"
        assert re.search(running, waited, re.MULTILINE), waited
        assert progress_while_running(seen["get_lines"], name), seen["get_lines"][-10:]
        bucket, _, prefix = final["exportUri"].removeprefix("s3://").partition("/")
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        exported = {item["Key"].removeprefix(prefix + "/") for item in listed.get("Contents", [])}
        assert {"config.json", "model.safetensors"} <= exported, (final["exportUri"], exported)
    finetune = await status(cluster, FTJ, "review-sentiment")
    assert finetune["evalMetrics"]["accuracy"] > 0.5, finetune["evalMetrics"]
    print(f"\nexamples/pipeline.yaml on the real node: both Succeeded in {took:.0f}s; images built in "
          f"{node.build_seconds:.0f}s; finetune eval {finetune['evalMetrics']}")
