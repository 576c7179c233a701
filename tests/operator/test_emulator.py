"""The emulated API server behaves like a real one where the operator's tests depend on it."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from k8s.admission import CRD_DIR, crd_problems
from k8s.cluster import Cluster, cluster, emulator, running_operator  # noqa: F401  (the fixtures)
from k8s.emulator import Emulator, serve
from k8s.kubelet import ApiError, KubeClient
from k8s.selectors import parse_label_selector
from support.jobs import EXAMPLES, example

PTJ = "/apis/kubeforge.io/v1alpha1/namespaces/default/pretrainjobs"
PODS = "/api/v1/namespaces/default/pods"


@pytest_asyncio.fixture
async def api(emulator: Emulator) -> AsyncIterator[KubeClient]:  # noqa: F811
    client = KubeClient.from_url(emulator.api_url)
    yield client
    await client.close()


def pretrain(name: str = "tiny") -> dict[str, Any]:
    job = example("pretrain-tiny.yaml")[0]
    job["metadata"] = {"name": name}
    return job


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": "busybox:1"}], **spec}}


async def raw(server: Emulator, method: str, path: str, body: Any = None,
              content_type: str = "application/json") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
            method, server.api_url + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type}) as response:
        return response.status, await response.json(content_type=None)


async def test_a_body_of_another_media_type_is_refused_as_a_real_server_refuses_it(emulator: Emulator) -> None:  # noqa: F811
    # aiohttp types a bytes body application/octet-stream unless told otherwise: kube-apiserver says 415.
    status, payload = await raw(emulator, "POST", PODS, pod("p"), content_type="application/octet-stream")
    assert (status, payload["reason"]) == (415, "UnsupportedMediaType")
    assert (await raw(emulator, "POST", PODS, pod("p")))[0] == 201


async def watch(api: KubeClient, path: str, **params: Any) -> list[tuple[str, str]]:
    """(type, name) of every event of a watch that the server ends after one second."""
    events = []
    async for event in api.watch(path, {"timeoutSeconds": 1, **params}):
        events.append((event["type"], event["object"]["metadata"].get("name")))
    return events


async def test_create_stamps_metadata_and_changes_bump_it(api: KubeClient) -> None:
    job = await api.request("POST", PTJ, body=pretrain())
    meta = job["metadata"]
    assert re.fullmatch(r"[0-9a-f-]{36}", meta["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert meta["generation"] == 1
    first = int(meta["resourceVersion"])
    other = await api.request("POST", PODS, body=pod("other"))
    assert int(other["metadata"]["resourceVersion"]) > first  # one counter across kinds
    assert other["metadata"]["uid"] != meta["uid"]

    changed = await api.patch("PretrainJob", "tiny", {"spec": {"backoffLimit": 5}}, "default")
    assert changed["metadata"]["generation"] == 2
    labelled = await api.patch("PretrainJob", "tiny", {"metadata": {"labels": {"a": "b"}}}, "default")
    assert labelled["metadata"]["generation"] == 2  # metadata is not the spec
    assert int(labelled["metadata"]["resourceVersion"]) > int(changed["metadata"]["resourceVersion"])
    status = await api.patch("PretrainJob", "tiny", {"status": {"phase": "Running"}}, "default", subresource="status")
    assert status["metadata"]["generation"] == 2
    assert status["metadata"]["uid"] == meta["uid"] and status["metadata"]["creationTimestamp"] == \
        meta["creationTimestamp"]
    same = await api.patch("PretrainJob", "tiny", {"metadata": {"labels": {"a": "b"}}}, "default")
    assert same["metadata"]["resourceVersion"] == status["metadata"]["resourceVersion"]  # a no-op changes nothing
    assert job["spec"]["checkpoint"] == {"intervalSteps": 100, "keep": 2}
    assert (await api.get("PretrainJob", "tiny", "default"))["spec"]["training"]["gradientAccumulationSteps"] == 1


async def test_lists_have_resource_versions_that_watches_resume_from(api: KubeClient) -> None:
    await api.create(pod("a"), "default")
    listing = await api.request("GET", PODS)
    assert listing["kind"] == "PodList" and int(listing["metadata"]["resourceVersion"]) >= 1
    await api.create(pod("b"), "default")
    await api.patch("Pod", "a", {"metadata": {"labels": {"x": "y"}}}, "default")
    assert await watch(api, PODS, resourceVersion=listing["metadata"]["resourceVersion"]) == [
        ("ADDED", "b"), ("MODIFIED", "a")]
    assert sorted(await watch(api, PODS)) == [("ADDED", "a"), ("ADDED", "b")]  # no version: the current state
    assert await watch(api, PODS, resourceVersion="1") == [("ERROR", None)]  # 410 Expired: older than history


async def test_label_selectors_filter_lists_and_watches(api: KubeClient) -> None:
    for name, labels in [("web", {"app": "x", "tier": "front"}), ("db", {"app": "x"}), ("cache", {"app": "y"})]:
        await api.create(pod(name, labels), "default")

    async def names(selector: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in await api.list("Pod", "default", label_selector=selector))

    assert await names("app=x") == ["db", "web"]
    assert await names("app=x,tier") == ["web"]
    assert await names("app!=x") == ["cache"]
    assert await names("!tier") == ["cache", "db"]
    assert await names("app in (x, y),tier notin (front)") == ["cache", "db"]
    with pytest.raises(ApiError) as bad:
        await names("app=(")
    assert bad.value.status == 400

    since = (await api.request("GET", PODS))["metadata"]["resourceVersion"]
    await api.patch("Pod", "db", {"metadata": {"labels": {"app": "z"}}}, "default")  # stops matching
    await api.patch("Pod", "cache", {"metadata": {"labels": {"app": "x"}}}, "default")  # starts matching
    await api.patch("Pod", "web", {"metadata": {"annotations": {"n": "1"}}}, "default")
    assert await watch(api, PODS, resourceVersion=since, labelSelector="app=x") == [
        ("DELETED", "db"), ("ADDED", "cache"), ("MODIFIED", "web")]
    pods = await api.list("Pod", "default", field_selector="metadata.name=web")
    assert [p["metadata"]["name"] for p in pods] == ["web"]


def test_label_selector_grammar() -> None:
    assert parse_label_selector("a=b,c")({"a": "b", "c": ""})
    assert not parse_label_selector("a=b,c")({"a": "b"})
    assert parse_label_selector("a==b,!c,d notin (e)")({"a": "b", "d": "f"})


async def test_status_subresource_splits_status_from_the_rest(api: KubeClient) -> None:
    await api.create(pretrain(), "default")
    main = await api.patch("PretrainJob", "tiny", {"spec": {"suspend": True}, "status": {"phase": "Hacked"}},
                           "default")
    assert main["spec"]["suspend"] is True and "status" not in main
    status = await api.patch("PretrainJob", "tiny", {"spec": {"suspend": False}, "status": {"phase": "Running"}},
                             "default", subresource="status")
    assert status["spec"]["suspend"] is True and status["status"] == {"phase": "Running"}

    created = await api.create({**pod("p"), "status": {"phase": "Running"}}, "default")
    assert created["status"]["phase"] == "Pending"  # create resets status
    await api.patch("Pod", "p", {"status": {"phase": "Succeeded"}}, "default")
    assert (await api.get("Pod", "p", "default"))["status"]["phase"] == "Pending"
    await api.patch("Pod", "p", {"status": {"phase": "Running"}}, "default", subresource="status")
    assert (await api.get("Pod", "p", "default"))["status"]["phase"] == "Running"


async def test_garbage_collector_deletes_what_deleted_owners_owned(emulator: Emulator, api: KubeClient) -> None:  # noqa: F811
    owner = await api.create(pretrain("owner"), "default")
    other = await api.create(pretrain("other"), "default")

    def ref(obj: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"], "controller": obj is owner, "blockOwnerDeletion": True}

    await api.create({**pod("child"), "metadata": {"name": "child", "ownerReferences": [ref(owner)]}}, "default")
    await api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc", "ownerReferences": [
        ref(owner)]}, "spec": {"clusterIP": "None", "ports": [{"name": "c10d", "port": 29500}]}}, "default")
    await api.create({**pod("shared"), "metadata": {"name": "shared", "ownerReferences": [ref(owner), ref(other)]}},
                     "default")
    await api.create(pod("bystander"), "default")

    await api.delete("PretrainJob", "owner", "default", propagation_policy="Background")
    for _ in range(100):
        if await api.get("Pod", "child", "default") is None and await api.get("Service", "svc", "default") is None:
            break
        await asyncio.sleep(0.05)
    assert await api.get("Pod", "child", "default") is None
    assert await api.get("Service", "svc", "default") is None
    shared = await api.get("Pod", "shared", "default")
    assert shared is not None and [r["name"] for r in shared["metadata"]["ownerReferences"]] == ["other"]
    assert await api.get("Pod", "bystander", "default") is not None


async def test_deletion_waits_for_finalizers(api: KubeClient) -> None:
    job = pretrain()
    job["metadata"]["finalizers"] = ["kubeforge.io/test"]
    created = await api.create(job, "default")
    deleting = await api.delete("PretrainJob", "tiny", "default")
    assert deleting is not None and deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == created["metadata"]["generation"] + 1
    with pytest.raises(ApiError) as added:
        await api.patch("PretrainJob", "tiny", {"metadata": {"finalizers": ["kubeforge.io/test", "x/y"]}}, "default")
    assert added.value.status == 422
    assert await api.get("PretrainJob", "tiny", "default") is not None
    await api.patch("PretrainJob", "tiny", {"metadata": {"finalizers": None}}, "default")
    assert await api.get("PretrainJob", "tiny", "default") is None


async def test_invalid_pretrain_job_is_422_naming_the_field(emulator: Emulator) -> None:  # noqa: F811
    job = pretrain()
    job["spec"]["training"]["learningRate"] = 0
    status, body = await raw(emulator, "POST", PTJ, job)
    assert status == 422 and body["reason"] == "Invalid"
    assert 'PretrainJob.kubeforge.io "tiny" is invalid: spec.training.learningRate' in body["message"]
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.training.learningRate"]

    both = pretrain()
    both["spec"]["training"]["epochs"] = 2.0  # CEL: exactly one of maxSteps/epochs
    status, body = await raw(emulator, "POST", PTJ, both)
    assert status == 422 and "spec.training" in body["message"] and "exactly one of maxSteps or epochs" in \
        body["message"]


async def test_transition_rules_see_the_old_object(api: KubeClient) -> None:
    await api.create(pretrain(), "default")
    with pytest.raises(ApiError) as changed:
        await api.patch("PretrainJob", "tiny", {"spec": {"model": {"size": "small"}}}, "default")
    assert changed.value.status == 422
    assert "spec.model" in changed.value.message and "cannot change after the job is created" in changed.value.message
    suspended = await api.patch("PretrainJob", "tiny", {"spec": {"suspend": True}}, "default")
    assert suspended["spec"]["suspend"] is True
    replaced = copy.deepcopy(suspended)
    replaced["spec"]["model"]["size"] = "small"
    with pytest.raises(ApiError) as put:
        await api.request("PUT", KubeClient.path("kubeforge.io/v1alpha1", "pretrainjobs", "default", "tiny"),
                          body=replaced)
    assert put.value.status == 422


async def test_examples_are_accepted(api: KubeClient) -> None:
    for n, manifest in enumerate(sorted(EXAMPLES.glob("*.yaml"))):
        namespace = f"examples-{n}"
        await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for document in yaml.safe_load_all(manifest.read_text()):
            created = await api.create(document, namespace)
            assert created["metadata"]["uid"], manifest


async def test_duplicates_conflicts_and_missing_things(emulator: Emulator, api: KubeClient) -> None:  # noqa: F811
    await api.create(pretrain(), "default")
    status, body = await raw(emulator, "POST", PTJ, pretrain())
    assert (status, body["reason"]) == (409, "AlreadyExists")
    assert body["message"] == 'pretrainjobs.kubeforge.io "tiny" already exists'

    stale = {"metadata": {"resourceVersion": "1"}, "spec": {"suspend": True}}
    status, body = await raw(emulator, "PATCH", f"{PTJ}/tiny", stale, "application/merge-patch+json")
    assert (status, body["reason"]) == (409, "Conflict")
    test_op = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
               {"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]}]
    status, _ = await raw(emulator, "PATCH", f"{PTJ}/tiny", test_op, "application/json-patch+json")
    assert status == 422  # a failed JSON-patch test, as a real server answers it
    status, _ = await raw(emulator, "PATCH", f"{PTJ}/tiny", {"spec": {}}, "application/strategic-merge-patch+json")
    assert status == 415  # custom resources take no strategic merge patches

    status, body = await raw(emulator, "GET", f"{PTJ}/nope")
    assert (status, body["reason"]) == (404, "NotFound")
    status, body = await raw(emulator, "POST", "/api/v1/namespaces/nowhere/pods", pod("p"))
    assert (status, body["message"]) == (404, 'namespaces "nowhere" not found')


async def test_pods_are_validated_and_bound_like_real_ones(emulator: Emulator, api: KubeClient) -> None:  # noqa: F811
    bad = pod("Bad_Name")
    bad["spec"]["containers"][0]["env"] = [{"name": "1X", "value": "v"}]
    status, body = await raw(emulator, "POST", PODS, bad)
    assert status == 422
    assert {c["field"] for c in body["details"]["causes"]} == {"metadata.name", "spec.containers[0].env[0].name"}

    await api.create(pod("p"), "default")
    with pytest.raises(ApiError) as immutable:
        await api.patch("Pod", "p", {"spec": {"nodeName": "n1"}}, "default")
    assert immutable.value.status == 422 and "pod updates may not change fields" in immutable.value.message
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"name": "n1"}}
    status, _ = await raw(emulator, "POST", f"{PODS}/p/binding", binding)
    assert status == 201
    assert (await api.get("Pod", "p", "default"))["spec"]["nodeName"] == "n1"
    status, _ = await raw(emulator, "POST", f"{PODS}/p/binding", binding)
    assert status == 409

    conditions = {"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "X", "status": "True"}]}}
    await api.patch("Pod", "p", conditions, "default", subresource="status",
                    content_type="application/strategic-merge-patch+json")
    merged = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    patched = await api.patch("Pod", "p", merged, "default", subresource="status",
                              content_type="application/strategic-merge-patch+json")
    assert {c["type"]: c["status"] for c in patched["status"]["conditions"]} == {
        "Ready": "True", "X": "True", "PodScheduled": "True"}  # merged by type, not replaced

    # Bound to a node, a pod terminates gracefully: it stays until the kubelet says it is done.
    deleting = await api.delete("Pod", "p", "default")
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 30
    assert await api.get("Pod", "p", "default") is not None
    await api.delete("Pod", "p", "default", grace_period_seconds=0)
    assert await api.get("Pod", "p", "default") is None


async def test_secrets_store_string_data_as_base64(api: KubeClient) -> None:
    secret = await api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                               "stringData": {"key": "value"}}, "default")
    assert secret["data"] == {"key": "dmFsdWU="} and "stringData" not in secret and secret["type"] == "Opaque"


async def test_deleting_a_namespace_deletes_its_contents(api: KubeClient) -> None:
    await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}})
    await api.create(pod("p"), "doomed")
    await api.delete("Namespace", "doomed")
    with pytest.raises(ApiError) as forbidden:
        await api.create(pod("q"), "doomed")
    assert forbidden.value.status == 403
    for _ in range(100):
        if await api.get("Namespace", "doomed") is None:
            break
        await asyncio.sleep(0.05)
    assert await api.get("Namespace", "doomed") is None
    assert await api.get("Pod", "p", "doomed") is None


async def test_discovery_serves_core_kinds_and_our_crds(api: KubeClient) -> None:
    core = {r["name"]: r for r in (await api.request("GET", "/api/v1"))["resources"]}
    assert {"pods", "pods/status", "services", "secrets", "events", "nodes", "namespaces"} <= set(core)
    assert (await api.request("GET", "/api/v1"))["groupVersion"] == "v1"
    ours = {r["name"]: r for r in (await api.request("GET", "/apis/kubeforge.io/v1alpha1"))["resources"]}
    assert {"pretrainjobs", "pretrainjobs/status", "finetunejobs", "finetunejobs/status"} <= set(ours)
    assert ours["pretrainjobs"]["kind"] == "PretrainJob" and ours["pretrainjobs"]["namespaced"] is True
    assert "kubeforge.io" in {g["name"] for g in (await api.request("GET", "/apis"))["groups"]}


async def test_kopf_runs_against_it(api: KubeClient, emulator: Emulator) -> None:  # noqa: F811
    import kopf

    in_loop = Cluster(api, "default", emulator=emulator)
    registry = kopf.OperatorRegistry()
    created: list[str] = []

    @kopf.on.create("kubeforge.io", "v1alpha1", "pretrainjobs", registry=registry)
    def on_create(name: str, patch: kopf.Patch, body: kopf.Body, **_: Any) -> None:
        created.append(name)
        patch.status["seen"] = True
        kopf.warn(body, reason="Seen", message="seen by the test operator")

    @kopf.on.delete("kubeforge.io", "v1alpha1", "pretrainjobs", registry=registry)
    def on_delete(**_: Any) -> None:
        pass

    async with running_operator(registry, in_loop):
        await api.create(pretrain(), "default")
        for _ in range(200):
            job = await api.get("PretrainJob", "tiny", "default")
            if (job.get("status") or {}).get("seen") and job["metadata"].get("finalizers"):
                break
            await asyncio.sleep(0.05)
        assert (job.get("status") or {}).get("seen") is True
        await api.delete("PretrainJob", "tiny", "default")
        for _ in range(200):
            if await api.get("PretrainJob", "tiny", "default") is None:
                break
            await asyncio.sleep(0.05)
        assert await api.get("PretrainJob", "tiny", "default") is None  # Kopf removed its finalizer
    assert created == ["tiny"]  # handled once
    events = await api.list("Event", "default", field_selector="involvedObject.name=tiny")
    assert [e["reason"] for e in events] == ["Seen"]


def test_the_crd_check_catches_what_a_real_server_refuses() -> None:
    crd = {"spec": {"versions": [{"schema": {"openAPIV3Schema": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": True, "exclusiveMinimum": True}}}}}]}}
    assert crd_problems(crd) == ["spec.versions[0].schema.openAPIV3Schema.properties[x].minimum: Invalid value: "
                                 "True: must be a number"]


def test_our_crds_would_install_on_a_real_server() -> None:
    for path in sorted(CRD_DIR.glob("*.yaml")):
        assert crd_problems(yaml.safe_load(path.read_text())) == [], path


@pytest.mark.emulator_only("kmock's scripted faults exist only in the emulator")
async def test_scripted_faults_take_precedence_and_change_nothing(cluster: Cluster) -> None:  # noqa: F811
    """kmock's DSL still works (here on the threaded emulator of the `cluster` fixture)."""
    cluster.emulator[f"post /api/v1/namespaces/{cluster.namespace}/pods"][:1] << 500
    with pytest.raises(ApiError) as failed:
        await cluster.apply(pod("flaky"))
    assert failed.value.status == 500
    assert await cluster.get("Pod", "flaky") is None  # the failed request stored nothing
    created = await cluster.apply(pod("flaky"))
    assert created[0]["metadata"]["uid"]


async def test_internal_failures_fail_the_server_block() -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("an emulator bug")

    with pytest.raises(AssertionError, match="the emulator failed internally"):
        async with serve() as server:
            server._list = broken  # type: ignore[method-assign]
            status, _ = await raw(server, "GET", PODS)
            assert status == 500
