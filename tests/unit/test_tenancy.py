"""Tenancy (issue 12, reproduction 3): a job uses only its namespace's storage, the operator acts only in
allowed namespaces. The rules are pure functions; the lifecycle turns a violation into a Failed job."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from support.jobs import example

from kubeforge.operator.lifecycle import Observed, reconcile
from kubeforge.operator.settings import OperatorSettings
from kubeforge.operator.tenancy import SettingError, UriPolicy, parse_label_selector, uri_violations, uri_within
from kubeforge.spec import Job, parse_job

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
ROOT = "s3://models/kf"
POLICY = UriPolicy(ROOT, allowed_prefixes=("s3://shared/datasets", "s3://scratch/{namespace}"))


def team_job(namespace: str = "team-a", *, data: str = f"{ROOT}/team-a/data/train.txt",
             checkpoint: str | None = None, base: str | None = None, warm_start: str | None = None) -> Job:
    """A FinetuneJob when base is given, else a PretrainJob, in namespace, with these URIs."""
    manifest: dict[str, Any] = copy.deepcopy(example("pretrain-tiny.yaml")[0])
    manifest["metadata"].update(namespace=namespace, uid="0123456789abcdef")
    manifest["spec"]["data"] = {"train": {"uri": data}}
    if checkpoint:
        manifest["spec"]["checkpoint"] = {"uri": checkpoint}
    if warm_start:
        manifest["spec"].setdefault("checkpoint", {})["warmStartFrom"] = warm_start
    if base:
        manifest["kind"] = "FinetuneJob"
        for field in ("model", "tokenizer"):
            manifest["spec"].pop(field, None)
        manifest["spec"]["baseModel"] = {"uri": base}
    return parse_job(manifest)


@pytest.mark.parametrize(("uri", "prefix", "inside"), [
    ("s3://models/kf/team-a/x", "s3://models/kf/team-a", True),
    ("s3://models/kf/team-a", "s3://models/kf/team-a", True),
    ("s3://models/kf/team-a/", "s3://models/kf/team-a", True),
    ("s3://models/kf/team-ab/x", "s3://models/kf/team-a", False),  # a stem is not a directory
    ("s3://models/kf/team-a/../team-b/x", "s3://models/kf/team-a", False),
    ("s3://models/kf/team-a//x", "s3://models/kf/team-a", False),
    ("s3://models-2/kf/team-a/x", "s3://models/kf/team-a", False),
    ("/data/team-a/x", "/data/team-a", True),
    ("file:///data/team-a/x", "/data/team-a", True),
    ("/data/team-a/../team-b", "/data/team-a", False),
    ("data/team-a/x", "/data/team-a", False),
])
def test_uri_within_compares_whole_segments(uri: str, prefix: str, inside: bool) -> None:
    assert uri_within(uri, prefix) is inside


def test_a_job_may_use_its_namespace_prefix_and_the_allow_list() -> None:
    job = team_job(data="s3://shared/datasets/shakespeare/train.txt", checkpoint=f"{ROOT}/team-a/runs/one",
                   base="s3://scratch/team-a/base-model")
    assert uri_violations(job, POLICY) == []


@pytest.mark.parametrize(("where", "field"), [
    ({"checkpoint": f"{ROOT}/team-b/runs/one"}, "spec.checkpoint.uri"),
    ({"warm_start": f"{ROOT}/team-b/pretrainjob/big-1234"}, "spec.checkpoint.warmStartFrom"),
    ({"base": f"{ROOT}/team-b/pretrainjob/big/export"}, "spec.baseModel.uri"),
    ({"base": "s3://scratch/team-b/base-model"}, "spec.baseModel.uri"),  # {namespace} is the job's own
    ({"data": f"{ROOT}/team-b/data/train.txt"}, "spec.data.train.uri"),
    ({"data": "/etc/passwd"}, "spec.data.train.uri"),  # absolute: where volumes are mounted
    ({"data": "../../etc/passwd"}, "spec.data.train.uri"),  # walks out of the image's working directory
    ({"data": "examples/../../secrets/train.txt"}, "spec.data.train.uri"),
])
def test_a_uri_of_another_namespace_is_named_by_its_field(where: dict[str, str], field: str) -> None:
    problems = uri_violations(team_job(**where), POLICY)
    assert len(problems) == 1 and problems[0].startswith(f"{field} ")
    assert "namespace team-a may use" in problems[0]


def test_a_relative_path_names_the_images_own_files_and_any_namespace_may_read_it() -> None:
    """examples/pipeline.yaml reads examples/data/..., which the trainer image ships in its working
    directory: the same read-only files in every namespace's pods."""
    job = team_job(data="examples/data/shakespeare/train.txt", base="examples/models/tiny")
    assert uri_violations(job, POLICY) == []
    for manifest in example("pipeline.yaml"):
        assert uri_violations(parse_job({**manifest, "metadata": {**manifest["metadata"], "namespace": "team-a"}}),
                              POLICY) == []


def test_the_rule_can_be_turned_off_for_a_single_tenant_cluster() -> None:
    assert uri_violations(team_job(checkpoint=f"{ROOT}/team-b/x"), UriPolicy(ROOT, enforced=False)) == []


def test_a_job_reaching_another_namespaces_checkpoints_fails_with_uri_not_allowed() -> None:
    """Before: team A's job got pods writing (and, through retention, deleting) under team B's prefix."""
    job = team_job(checkpoint=f"{ROOT}/team-b/pretrainjob/big-1234")
    settings = OperatorSettings(storage_root=ROOT)
    plan = reconcile(Observed(job=job, status={}, pods=[], gpu_nodes=True, checkpoint_uri=f"{ROOT}/team-b/x",
                              uri_policy=settings.uri_policy()), NOW)
    assert plan.launch is None
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "URINotAllowed")
    assert plan.status["message"].startswith("spec.checkpoint.uri s3://models/kf/team-b/pretrainjob/big-1234 ")
    assert plan.events == [("Warning", "URINotAllowed", plan.status["message"])]


def test_a_job_inside_its_prefix_is_launched() -> None:
    job = team_job()
    default_checkpoint = f"{ROOT}/team-a/pretrainjob/tiny-shakespeare-01234567"
    plan = reconcile(Observed(job=job, status={}, pods=[], gpu_nodes=True, checkpoint_uri=default_checkpoint,
                              uri_policy=OperatorSettings(storage_root=ROOT).uri_policy()), NOW)
    assert plan.launch is not None and plan.status["reason"] == "PodsCreated"


def test_the_default_settings_restrict_uris() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.restrict_uris_to_namespace
    assert uri_violations(team_job(checkpoint="s3://kubeforge/jobs/team-b/x"), settings.uri_policy())
    env = {"KUBEFORGE_RESTRICT_URIS_TO_NAMESPACE": "false",
           "KUBEFORGE_ALLOWED_URI_PREFIXES": "s3://shared/datasets, s3://scratch/{namespace}"}
    relaxed = OperatorSettings.from_env(env)
    assert not relaxed.restrict_uris_to_namespace
    assert relaxed.allowed_uri_prefixes == ("s3://shared/datasets", "s3://scratch/{namespace}")


# ---------------------------------------------------------------------------------------------
# Namespaces


@pytest.mark.parametrize(("selector", "labels", "allowed"), [
    ("kubeforge.io/tenant=enabled", {"kubeforge.io/tenant": "enabled"}, True),
    ("kubeforge.io/tenant=enabled", {"kubeforge.io/tenant": "off"}, False),
    ("kubeforge.io/tenant==enabled", {}, False),
    ("team in (a, b),!frozen", {"team": "b"}, True),
    ("team in (a, b),!frozen", {"team": "b", "frozen": ""}, False),
    ("team notin (c), gpu", {"gpu": "yes"}, True),
    ("team!=c", {"team": "c"}, False),
])
def test_the_namespace_selector_decides_where_the_operator_acts(
        selector: str, labels: dict[str, str], allowed: bool) -> None:
    settings = OperatorSettings.from_env({"KUBEFORGE_NAMESPACE_SELECTOR": selector})
    assert settings.acts_in("team-x", labels) is allowed


def test_an_unknown_namespace_never_matches_a_selector_and_a_list_still_applies() -> None:
    selective = OperatorSettings(namespace_selector="kubeforge.io/tenant")
    assert not selective.acts_in("new-namespace", None)
    listed = OperatorSettings(namespaces=("team-a",), namespace_selector="kubeforge.io/tenant")
    assert not listed.acts_in("team-b", {"kubeforge.io/tenant": ""})
    assert listed.acts_in("team-a", {"kubeforge.io/tenant": ""})
    assert OperatorSettings().acts_in("anything", None)


@pytest.mark.parametrize("env", [{"KUBEFORGE_NAMESPACE_SELECTOR": "team in a,b"},
                                 {"KUBEFORGE_NAMESPACE_SELECTOR": "=x"},
                                 {"KUBEFORGE_RESTRICT_URIS_TO_NAMESPACE": "perhaps"}])
def test_a_bad_setting_is_refused_at_startup_naming_its_variable(env: dict[str, str]) -> None:
    with pytest.raises(SettingError, match=f"^{next(iter(env))}: "):
        OperatorSettings.from_env(env)


def test_selector_terms_parse_as_kubernetes_writes_them() -> None:
    terms = parse_label_selector("a=b, c notin (d,e) ,f", "X")
    assert [(t.key, t.operator, t.values) for t in terms] == [
        ("a", "in", ("b",)), ("c", "notin", ("d", "e")), ("f", "exists", ())]
