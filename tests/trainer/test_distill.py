"""method distill: a half-depth student learns from a finetuned teacher (classification and causal LM),
its result names the teacher, the KL term is what moves it, a resume is exact and the teacher is no
part of the checkpoint; a teacher with another tokenizer or label set is refused before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.jobs import write_manifest
from support.models import INSTRUCTIONS, REVIEWS, finetune_manifest, records, tiny_base, tiny_tokenizer

from kubeforge import cli
from kubeforge.spec import FinetuneJob, JobError, TokenizerSpec, parse_job
from kubeforge.trainer import data as trainer_data
from kubeforge.trainer.checkpoint import step_prefix
from kubeforge.trainer.distill import soft_kl
from kubeforge.trainer.loop import train
from kubeforge.trainer.tokenization import train_tokenizer


def job_manifest(name: str, base: Path, root: Path, *, task: str = "sequence-classification", method: str = "full",
                 steps: int = 60, **spec: Any) -> dict[str, Any]:
    """A FinetuneJob on the example reviews (or instructions), evaluated on the whole eval split."""
    manifest = finetune_manifest(str(base), root, task=task, method=method, max_steps=steps, learning_rate=3e-3)
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"].update({"batchSize": 16, "evalBatches": 40, "warmupSteps": 2})
    manifest["spec"].update(spec)
    return manifest


def as_job(manifest: dict[str, Any]) -> FinetuneJob:
    job = parse_job(manifest)
    assert isinstance(job, FinetuneJob)
    return job


def run(manifest: dict[str, Any], base: Path, teacher: Path | None = None) -> Any:
    job = as_job(manifest)
    return train(job, checkpoint_root=job.spec.checkpoint.uri, base_model_uri=str(base),
                 teacher_uri=str(teacher) if teacher else None)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The teacher's base (2 layers) and the student's (1 layer), with one tokenizer."""
    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("bases")
    return tiny_base(root / "teacher", tokenizer=tokenizer), tiny_base(root / "student", tokenizer=tokenizer, layers=1)


@pytest.fixture(scope="module")
def teacher(bases: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A review classifier finetuned (fully) from the 2-layer base, long enough to be confident (about
    0.9 accuracy): a teacher near chance on every review has little to teach. Its export and result."""
    root = tmp_path_factory.mktemp("teacher")
    result = run(job_manifest("teacher", bases[0], root / "out", steps=150), bases[0])
    return root / "out" / "export", result


def distill_manifest(student_base: Path, teacher_dir: Path, root: Path, *, alpha: float = 0.5,
                     temperature: float = 2.0, steps: int = 60, **spec: Any) -> dict[str, Any]:
    return job_manifest("student", student_base, root, method="distill", steps=steps, teacher={"uri": str(teacher_dir)},
                        distill={"temperature": temperature, "alpha": alpha}, **spec)


def classifier(directory: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory).eval()


def eval_batches(tokenizer_dir: Path) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    job = as_job(job_manifest("probe", tokenizer_dir, tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    _, eval_set, _ = trainer_data.classification_sets(job.spec.data, None, tokenizer, 64)
    return trainer_data.eval_batches(eval_set, 32, 100, 0, 1)


def agreement(student: Any, teacher: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """The share of eval reviews on which the student predicts the teacher's class."""
    same = total = 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            same += int((student(**inputs).logits.argmax(-1) == teacher(**inputs).logits.argmax(-1)).sum())
            total += len(batch["labels"])
    return same / total


def test_a_half_depth_student_distils_from_a_finetuned_teacher_named_in_its_result(
        bases: tuple[Path, Path], teacher: tuple[Path, Any], tmp_path: Path) -> None:
    teacher_dir, teacher_result = teacher
    result = run(distill_manifest(bases[1], teacher_dir, tmp_path / "out"), bases[1], teacher_dir)
    assert result.teacher_uri == str(teacher_dir) and result.summary().teacher_uri == str(teacher_dir)
    saved = json.loads((tmp_path / "out" / "export" / "result.json").read_text())
    assert saved["teacherUri"] == str(teacher_dir)
    accuracy = result.final_eval["accuracy"]
    # The two classes are balanced (chance is 0.5); the teacher is at about 0.9.
    assert accuracy > 0.7, (accuracy, teacher_result.final_eval)
    student = classifier(tmp_path / "out" / "export")
    assert student.config.n_layer == 1 and classifier(teacher_dir).config.n_layer == 2
    # The checkpoint holds the student alone: the teacher is never trained, so never saved.
    weights = torch.load(tmp_path / "out" / step_prefix(60) / "model.pt", weights_only=True)
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in student.parameters())


def test_the_kl_term_alone_moves_the_student_to_the_teacher_against_the_labels(
        bases: tuple[Path, Path], teacher: tuple[Path, Any], tmp_path: Path) -> None:
    """Trained on flipped labels, a student follows the labels at alpha 0 and the teacher at alpha 1."""
    flipped = tmp_path / "flipped.jsonl"
    swap = {"positive": "negative", "negative": "positive"}
    flipped.write_text("".join(json.dumps({**r, "label": swap[r["label"]]}) + "\n"
                               for r in records(REVIEWS / "train.jsonl")))
    agreements = {}
    for alpha in (0.0, 1.0):
        manifest = distill_manifest(bases[1], teacher[0], tmp_path / f"alpha-{alpha}", alpha=alpha, temperature=1.0)
        manifest["spec"]["data"]["train"]["uri"] = str(flipped)
        run(manifest, bases[1], teacher[0])
        agreements[alpha] = agreement(classifier(tmp_path / f"alpha-{alpha}" / "export"), classifier(teacher[0]),
                                      eval_batches(bases[1]))
    assert agreements[1.0] > 0.85 and agreements[0.0] < 0.4, agreements


def test_a_killed_student_resumes_to_the_uninterrupted_result(
        bases: tuple[Path, Path], teacher: tuple[Path, Any], tmp_path: Path) -> None:
    manifest = distill_manifest(bases[1], teacher[0], tmp_path / "out", steps=12,
                                checkpoint={"uri": str(tmp_path / "out"), "intervalSteps": 6})
    uninterrupted = run(manifest, bases[1], teacher[0])
    shutil.rmtree(tmp_path / "out" / step_prefix(12))  # as if the run had died after its step-6 checkpoint
    resumed = run(manifest, bases[1], teacher[0])
    assert resumed.resumed_from_step == 6 and resumed.step == 12
    assert resumed.train_loss == uninterrupted.train_loss
    assert resumed.final_eval == uninterrupted.final_eval


def test_a_causal_lm_student_learns_the_teachers_token_distributions(bases: tuple[Path, Path], tmp_path: Path) -> None:
    """The teacher here is the 2-layer base itself: alpha 1 brings the student's next-token
    distributions on the responses closer to it than they were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = distill_manifest(bases[1], bases[0], tmp_path / "out", alpha=1.0, steps=30, task="causal-lm")
    manifest["spec"]["data"] = {"train": {"uri": str(INSTRUCTIONS / "train.jsonl")},
                                "eval": {"uri": str(INSTRUCTIONS / "eval.jsonl")}}
    job = as_job(manifest)
    _, eval_set = trainer_data.instruction_sets(job.spec.data, None, AutoTokenizer.from_pretrained(bases[1]), 64)
    batch = trainer_data.eval_batches(eval_set, 32, 1, 0, 1)[0]
    teacher_model = AutoModelForCausalLM.from_pretrained(bases[0]).eval()

    def kl_to_teacher(directory: Path) -> float:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            student = AutoModelForCausalLM.from_pretrained(directory).eval()
            return float(soft_kl(student(**inputs).logits, teacher_model(**inputs).logits, 2.0, batch["labels"]))

    before = kl_to_teacher(bases[1])
    result = run(manifest, bases[1], bases[0])
    after = kl_to_teacher(tmp_path / "out" / "export")
    assert result.teacher_uri == str(bases[0]) and after < 0.5 * before, (before, after)


def test_a_teacher_with_another_tokenizer_or_label_set_is_refused_before_training(
        bases: tuple[Path, Path], teacher: tuple[Path, Any], tmp_path: Path) -> None:
    texts = [r["text"] for r in records(REVIEWS / "train.jsonl")]
    other_tokenizer = tiny_base(tmp_path / "other", tokenizer=train_tokenizer(texts, TokenizerSpec(vocab_size=300)))
    untrained = bases[0]  # a causal LM: its config's labels are transformers' LABEL_0 and LABEL_1
    cases = [(other_tokenizer, "teacher.uri: the teacher's tokenizer is not the student's (baseModel's): 300 tokens "
                               "against 512"),
             (untrained, "teacher.uri: the teacher classifies into ['LABEL_0', 'LABEL_1'], the student into "
                         "['negative', 'positive']")]
    for wrong, words in cases:
        root = tmp_path / wrong.name
        with pytest.raises(JobError) as refused:
            run(distill_manifest(bases[1], wrong, root), bases[1], wrong)
        assert str(refused.value).startswith(words), refused.value
        assert not root.exists() or not any(root.rglob("manifest.json"))  # nothing trained, nothing committed


def test_kubeforge_run_trains_the_teacher_first_and_the_student_from_its_export(
        bases: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A student listed before the FinetuneJob it names as teacher.fromFinetuneJob: run orders them."""
    teacher_job = job_manifest("review-teacher", bases[0], tmp_path / "unused", steps=4)
    student_job = distill_manifest(bases[1], bases[0], tmp_path / "unused", steps=4)
    student_job["spec"]["teacher"] = {"fromFinetuneJob": "review-teacher"}
    for manifest in (teacher_job, student_job):
        del manifest["spec"]["checkpoint"]["uri"]  # under --output, as `kubeforge run` lays jobs out
    pipeline = write_manifest(tmp_path / "distill.yaml", student_job, teacher_job)
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(pipeline), "--output", str(tmp_path / "runs"), "--no-progress", "--json"])
    assert exited.value.code == 0
    teacher_result, student_result = json.loads(capsys.readouterr().out)
    assert teacher_result["job"] == "review-teacher" and student_result["job"] == "student"
    assert student_result["teacherUri"] == teacher_result["exportUri"]


def test_a_prompt_tuned_teacher_teaches_with_its_adapter(bases: tuple[Path, Path], tmp_path: Path) -> None:
    """A teacher exported as its base plus adapter/ (prompt tuning) predicts, as a teacher, what its
    export does with the adapter, not what its bare base does."""
    from peft import PeftModel

    from kubeforge.trainer.distill import Teacher

    tuned = job_manifest("prompt-teacher", bases[0], tmp_path / "teacher", method="prompt-tuning", steps=4,
                         promptTuning={"numVirtualTokens": 4})
    run(tuned, bases[0])
    export = tmp_path / "teacher" / "export"
    student = as_job(distill_manifest(bases[1], export, tmp_path / "student"))
    teacher = Teacher(student.spec, export, torch.device("cpu"))
    inputs = {k: v for k, v in eval_batches(bases[1])[0].items() if k != "labels"}
    with torch.no_grad():
        taught = teacher.model(**inputs).logits
        with_adapter = PeftModel.from_pretrained(classifier(export), export / "adapter").eval()(**inputs).logits
        bare = classifier(export)(**inputs).logits
    assert torch.allclose(taught, with_adapter) and not torch.allclose(taught, bare)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
