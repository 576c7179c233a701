"""What the API server admits: names the operator can serve, and what is trained fixed at creation.

Against the emulator by default, against a real API server with KUBEFORGE_E2E_KUBECONFIG (its own
schema and CEL evaluation: the CRDs of crds/ are applied there).
"""

from __future__ import annotations

from typing import Any

import pytest
from k8s.kubelet import ApiError
from support.jobs import example, tiny_pretrain, with_change

PTJ = "PretrainJob"


async def refusal(cluster: Any, call: Any) -> str:
    with pytest.raises(ApiError) as refused:
        await call
    assert refused.value.status == 422, refused.value
    return str(refused.value)


@pytest.mark.parametrize("name", ["7b-pretrain", "a" * 60])
async def test_names_the_operator_cannot_serve_are_refused(cluster: Any, name: str) -> None:
    """`7b-pretrain-ptj` is no DNS-1035 label (its Service would be refused); a 60-character name
    makes a Service name of 64."""
    message = await refusal(cluster, cluster.apply(tiny_pretrain(name)))
    assert "metadata.name" in message


@pytest.mark.parametrize("base_model", [{"fromPretrainJob": "base", "fromSweepJob": "search"},
                                        {"uri": "s3://models/m", "fromSweepJob": "search"}])
async def test_a_base_model_from_more_than_one_source_is_refused(cluster: Any, base_model: dict[str, str]) -> None:
    finetune = with_change(example("finetune-lora-classify.yaml")[0], "spec.baseModel", base_model)
    message = await refusal(cluster, cluster.apply(finetune))
    assert "set exactly one of uri, fromPretrainJob or fromSweepJob" in message
    admitted = await cluster.apply(with_change(finetune, "spec.baseModel", {"fromSweepJob": "search"}))
    assert admitted[0]["spec"]["baseModel"] == {"fromSweepJob": "search"}


async def test_the_longest_name_is_admitted(cluster: Any) -> None:
    created = await cluster.apply(tiny_pretrain("a" * 59))
    assert created[0]["metadata"]["name"] == "a" * 59


async def test_what_is_trained_cannot_change_but_the_run_policy_can(cluster: Any) -> None:
    await cluster.apply(tiny_pretrain("fixed"))
    message = await refusal(cluster, cluster.patch(PTJ, "fixed", {"spec": {"training": {"maxSteps": 999}}}))
    assert "spec.training" in message and "cannot change after the job is created" in message
    message = await refusal(cluster, cluster.patch(PTJ, "fixed", {"spec": {"checkpoint": {"uri": "s3://x/y"}}}))
    assert "spec.checkpoint" in message
    changed = await cluster.patch(PTJ, "fixed", {"spec": {"suspend": True, "backoffLimit": 9,
                                                          "stallTimeoutSeconds": 600}})
    assert changed["spec"]["suspend"] is True and changed["spec"]["backoffLimit"] == 9
