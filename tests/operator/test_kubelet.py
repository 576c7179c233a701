"""The kubelet harness runs pods' containers as local processes, as a node would."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import Cluster, cluster, kubelet, real_cluster  # noqa: F401  (the fixtures)
from k8s.kubelet import Kubelet

PROBE = "import json, os, sys; print('hello from', os.environ.get('POD_IP')); " \
        "open(sys.argv[1], 'w').write(json.dumps({k: os.environ.get(k) for k in sys.argv[2:]}))"


def python_pod(name: str, code: str, *args: str, env: list[dict[str, Any]] | None = None, **extra: Any
               ) -> dict[str, Any]:
    container = {"name": "trainer", "image": "python:3", "command": ["python", "-c", code, *args],
                 "env": env or [], **extra.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **extra.pop("metadata", {})},
            "spec": {"restartPolicy": "Never", "containers": [container], **extra}}


async def finished(cluster: Cluster, name: str, timeout: float = 30) -> dict[str, Any]:  # noqa: F811
    async def done() -> dict[str, Any] | None:
        pod = await cluster.get("Pod", name)
        return pod if pod and pod["status"].get("phase") in ("Succeeded", "Failed") else None
    return await cluster.wait_for(done, timeout, f"pod {name} to finish")


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


async def test_a_pod_runs_to_success_with_its_termination_message(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    await cluster.apply(python_pod("ok", PROBE, "/dev/termination-log", "POD_IP", "RANK", "GLOO_SOCKET_IFNAME",
                                   "PATH", env=[{"name": "RANK", "value": "3"},
                                                {"name": "POD_IP", "valueFrom": {"fieldRef": {
                                                    "fieldPath": "status.podIP"}}}]))
    pod = await finished(cluster, "ok")
    assert pod["status"]["phase"] == "Succeeded", kubelet.logs("ok")
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    seen = json.loads(state["message"])
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.0.") and ip != "127.0.0.1" and pod["spec"]["nodeName"] == kubelet.node_name
    assert seen == {"POD_IP": ip, "RANK": "3", "GLOO_SOCKET_IFNAME": "lo", "PATH": os.environ["PATH"]}
    assert f"hello from {ip}" in kubelet.logs("ok")
    assert kubelet.runs["ok"].argv[0] == sys.executable


async def test_failures_report_exit_code_and_message(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    crash = "import sys; print('boom: the data is missing', file=sys.stderr); sys.exit(3)"
    await cluster.apply(python_pod("fallback", crash, container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    own = "import sys; open(sys.argv[1], 'w').write('{\"error\": \"bad spec\"}'); print('noise'); sys.exit(2)"
    await cluster.apply(python_pod("own", own, "/dev/termination-log",
                                   container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    await cluster.apply(python_pod("plain", crash))  # policy File: the log is not the message
    fallback, own_pod, plain = [await finished(cluster, name) for name in ("fallback", "own", "plain")]
    assert fallback["status"]["phase"] == "Failed"
    assert terminated(fallback)["exitCode"] == 3 and terminated(fallback)["reason"] == "Error"
    assert "boom: the data is missing" in terminated(fallback)["message"]
    assert terminated(own_pod)["exitCode"] == 2 and terminated(own_pod)["message"] == '{"error": "bad spec"}'
    assert terminated(plain)["exitCode"] == 3 and "message" not in terminated(plain)
    assert len({p["status"]["podIP"] for p in (fallback, own_pod, plain)}) == 3  # distinct IPs


async def test_env_comes_from_secrets(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    env = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}]
    pod = python_pod("secretive", PROBE, "/dev/termination-log", "PASSWORD", "AWS_ACCESS_KEY_ID", env=env,
                     container={"envFrom": [{"secretRef": {"name": "s3"}}]})
    await cluster.apply(pod)

    async def held() -> bool:  # ContainerCreating comes first, as on a node
        status = (await cluster.get("Pod", "secretive"))["status"]
        states = status.get("containerStatuses") or [{}]
        return (states[0].get("state") or {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
    # As on a node: a missing secret holds the container, which starts once the secret exists.
    await cluster.wait_for(held, 10, "the missing secret to be reported as CreateContainerConfigError")
    assert kubelet.runs["secretive"].process is None
    await cluster.create_secret("creds", {"password": "hunter2"})
    await cluster.create_secret("s3", {"AWS_ACCESS_KEY_ID": "from-the-secret"})
    state = terminated(await finished(cluster, "secretive"))
    assert json.loads(state["message"]) == {"PASSWORD": "hunter2", "AWS_ACCESS_KEY_ID": "from-the-secret"}


async def test_deleting_a_pod_kills_its_process(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    sleeper = "import time; print('up', flush=True); time.sleep(600)"
    await cluster.apply(python_pod("sleeper", sleeper, terminationGracePeriodSeconds=5))
    run = await kubelet.wait_running("sleeper", 20)
    await cluster.wait_for(lambda: "up" in kubelet.logs("sleeper"), 20, "the process to start")
    pid = run.process.pid
    deleting = await cluster.delete("Pod", "sleeper")
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 5  # graceful: the kubelet finishes it

    async def gone() -> bool:
        return await cluster.get("Pod", "sleeper") is None
    await cluster.wait_for(gone, 20, "the kubelet to finish the deletion")
    assert run.exit_code == 128 + signal.SIGTERM  # stopped by SIGTERM within the grace period
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"process {pid} of the deleted pod still runs")


async def test_kill_is_a_crash_and_lose_node_removes_the_pod(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    sleeper = "import time; time.sleep(600)"
    await cluster.apply(python_pod("crashing", sleeper))
    await cluster.apply(python_pod("stranded", sleeper))
    await kubelet.wait_running("crashing", 20)
    stranded = await kubelet.wait_running("stranded", 20)
    await kubelet.kill("crashing")
    pod = await finished(cluster, "crashing")
    assert pod["status"]["phase"] == "Failed" and terminated(pod)["exitCode"] == 137
    await kubelet.lose_node("stranded")
    assert await cluster.get("Pod", "stranded") is None
    assert not stranded.alive


async def test_master_addr_resolves_to_the_rank0_pod(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    labels = {"kubeforge.io/job-name": "job", "kubeforge.io/job-kind": "ptj"}
    await cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "job-ptj"},
                         "spec": {"clusterIP": "None", "selector": labels,
                                  "ports": [{"name": "c10d", "port": 29500}]}})
    env = [{"name": "MASTER_ADDR", "value": "w0.job-ptj"}]
    await cluster.apply(python_pod("w1", PROBE, "/dev/termination-log", "MASTER_ADDR", env=env, hostname="w1",
                                   subdomain="job-ptj", metadata={"labels": labels}))
    await cluster.apply(python_pod("w0", "import time; time.sleep(600)", hostname="w0", subdomain="job-ptj",
                                   metadata={"labels": labels}))
    worker = await finished(cluster, "w1")
    master = await cluster.get("Pod", "w0")
    assert json.loads(terminated(worker)["message"]) == {"MASTER_ADDR": master["status"]["podIP"]}


async def test_kubeforge_commands_run_the_installed_cli(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    await cluster.apply(python_pod("cli", "", container={"command": ["kubeforge", "validate", "/no/such/file"],
                                                         "terminationMessagePolicy": "FallbackToLogsOnError"}))
    pod = await finished(cluster, "cli")
    assert kubelet.runs["cli"].argv[:3] == [sys.executable, "-m", "kubeforge"]
    assert terminated(pod)["exitCode"] != 0 and "/no/such/file" in terminated(pod)["message"]


async def test_pods_go_where_gpus_are(cluster: Cluster, kubelet: Kubelet) -> None:  # noqa: F811
    await cluster.add_node("gpu-node", gpus=1)
    await cluster.add_node("cpu-node")
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    sleeper = "import time; time.sleep(600)"
    await cluster.apply(python_pod("first", sleeper, container=gpu))
    await kubelet.wait_running("first", 20)
    assert (await cluster.get("Pod", "first"))["spec"]["nodeName"] == "gpu-node"
    await cluster.apply(python_pod("second", sleeper, container=gpu))

    async def unschedulable() -> str | None:
        conditions = (await cluster.get("Pod", "second"))["status"].get("conditions") or []
        return next((c["message"] for c in conditions if c.get("reason") == "Unschedulable"), None)
    message = await cluster.wait_for(unschedulable, 10, "the second GPU pod to be unschedulable")
    assert "Insufficient nvidia.com/gpu" in message
    await cluster.apply(python_pod("cpu", sleeper))
    await kubelet.wait_running("cpu", 20)
    # Any node fits it: the harness's own one too, where a real control plane has it registered.
    assert (await cluster.get("Pod", "cpu"))["spec"]["nodeName"] in ("gpu-node", "cpu-node", kubelet.node_name)


@pytest.mark.emulator_only("it points a kubeconfig at the emulator to test the kubeconfig path itself")
async def test_the_real_cluster_path_works_from_a_kubeconfig(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """`KUBEFORGE_E2E_KUBECONFIG` mode, pointed at the emulator: CRDs, namespace, harness, Kopf login."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster.url}}],
        "users": [{"name": "tester", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "tester"}}]}))
    async with real_cluster(str(kubeconfig)) as real:
        assert real.real and real.namespace.startswith("kf-e2e-") and real.url == cluster.url
        assert await cluster.client.get("Namespace", real.namespace) is not None
        info = real.connection_info()
        assert (info.server, info.scheme, info.token) == (cluster.url, "Bearer", "secret-token")
        assert not await real.has_schedulable_nodes()
        harness = Kubelet(real.client, real.namespace, tmp_path / "kubelet")
        await harness.start(threaded=True)
        try:
            await real.apply(python_pod("via-kubeconfig", "print('ok')"))
            await real.apply(python_pod("via-kubeconfig", "print('ok')", metadata={"labels": {"again": "yes"}}))
            pod = await finished(real, "via-kubeconfig")
            assert pod["status"]["phase"] == "Succeeded" and pod["metadata"]["labels"] == {"again": "yes"}
        finally:
            await harness.stop()
        assert harness.errors == []
    namespace = await cluster.client.get("Namespace", real.namespace)
    assert namespace is None or namespace["metadata"].get("deletionTimestamp")  # cleaned up
