"""A SweepJob is refused at creation when a parameter names no field of its template, or takes a value
the template's schema refuses: the problem names the parameter. The CRD checks what it can."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from k8s.admission import admit
from support.jobs import example

from kubeforge.spec import FinetuneJob, SpecError, SweepJob, load_manifests, parse_sweep, trial_manifest

SWEEP = example("sweep-lora-classify.yaml")[1]


def with_change(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of document with the dotted path (list items as `name[i]`) set to value."""
    changed = copy.deepcopy(document)
    node: Any = changed
    *parents, leaf = re.findall(r"[^.\[\]]+", path)
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(leaf) if isinstance(node, list) else leaf] = value
    return changed


def problems(sweep: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as refused:
        parse_sweep(sweep)
    return refused.value.problems


def test_the_example_parses_with_its_parameters_and_objective() -> None:
    pretrain, sweep = load_manifests(yaml.safe_dump_all(example("sweep-lora-classify.yaml")))
    assert isinstance(sweep, SweepJob) and pretrain.kind == "PretrainJob"
    assert [p.path for p in sweep.spec.parameters] == ["training.learningRate", "lora.r"]
    assert sweep.spec.objective.eval_name == "loss" and sweep.trial_name(3) == "review-sweep-t3"


def test_a_trial_is_the_template_with_its_values_set() -> None:
    sweep = parse_sweep(SWEEP)
    manifest = trial_manifest(sweep.spec.template, "review-sweep-t0", "team-a",
                              {"training.learningRate": 0.002, "lora.r": 4})
    trial = FinetuneJob.model_validate(manifest)
    assert trial.spec.training.learning_rate == 0.002 and trial.spec.lora_settings().r == 4
    assert trial.spec.lora_settings().target_modules == ["c_attn", "c_proj", "c_fc"]  # the template's own
    assert trial.namespace == "team-a"


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.parameters[0].path", "training.learnRate",
     "parameters[0].path: training.learnRate is no field of the template's spec"),
    ("spec.parameters[0].path", "lora", "parameters[0].path: lora is an object, not a value"),
    ("spec.parameters[0].high", 2.0, "parameters[0] (training.learningRate = 2.0): the FinetuneJob schema refuses "
                                     "it: training.learningRate: Input should be less than or equal to 1"),
    ("spec.parameters[1].values", [4, 0], "parameters[1] (lora.r = 0): the FinetuneJob schema refuses it: lora.r"),
    ("spec.objective.metric", "eval.perplexity",
     "objective.metric: a sequence-classification trial reports eval.loss, eval.accuracy, eval.f1"),
    ("spec.template.spec.training.batchSize", 0, "template.spec.training.batchSize"),
    ("spec.algorithm", "grid", "algorithm grid needs a step on every float parameter"),
])
def test_a_parameter_the_template_refuses_is_named(path: str, value: Any, expected: str) -> None:
    assert any(expected in p for p in problems(with_change(SWEEP, path, value))), problems(
        with_change(SWEEP, path, value))


def test_a_parameter_into_a_block_of_another_method_is_refused_by_that_rule() -> None:
    sweep = with_change(SWEEP, "spec.parameters[1]", {"path": "ia3.targetModules", "type": "choice",
                                                        "values": [["c_attn"]]})
    assert any("ia3 is only valid with method: ia3" in p for p in problems(sweep))


def test_the_crd_refuses_bad_distributions_and_too_long_names() -> None:
    assert admit(SWEEP) == []
    assert any("low below high" in p for p in admit(with_change(SWEEP, "spec.parameters[0].high", 1.0e-5)))
    assert any("values is set with type choice only" in p
               for p in problems(with_change(SWEEP, "spec.parameters[0].values", [1])))
    assert any("parallelism must not exceed maxTrials" in p for p in admit(with_change(SWEEP, "spec.parallelism", 7)))
    assert any("trial name" in p for p in problems(with_change(SWEEP, "metadata.name", "s" * 57)))
