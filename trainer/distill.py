"""Knowledge distillation (method distill): the teacher, checked against the student and frozen,
and the loss that blends its softened predictions with the labels (Hinton et al., 2015).

The teacher is never trained: it runs in eval mode (no dropout) under no_grad, on the student's
device, outside the optimizer and the checkpoint. Its logits are a function of the batch alone, so
a run resumed from a checkpoint computes the same KL term as the run that wrote it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubeforge.spec import DistillSpec, FinetuneSpec, JobError, S3Spec
from kubeforge.trainer.data import IGNORE_INDEX
from kubeforge.trainer.models import ADAPTER_DIR, fetch_model_dir
from kubeforge.trainer.tokenization import ensure_pad_token

log = logging.getLogger(__name__)


class TeacherError(JobError):
    """A teacher the student cannot learn from (another tokenizer, other labels, too few positions)."""


def teacher_field(spec: FinetuneSpec) -> str:
    """The field that names the teacher, as errors name it."""
    assert spec.teacher is not None
    return "teacher.uri" if spec.teacher.uri else "teacher.fromFinetuneJob"


def fetch_teacher(spec: FinetuneSpec, uri: str | None, s3: S3Spec | None, scratch: Path,
                  student_tokenizer: Any) -> Path:
    """The teacher's model directory, refused unless it tokenizes as the student does: the KL term
    compares the two models' predictions token by token, which needs the same token ids."""
    if uri is None:
        raise TeacherError("teacher: no teacher URI was resolved for this job")
    directory = fetch_model_dir(uri, s3, scratch / "teacher", field="teacher")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ensure_pad_token(tokenizer)
    theirs, ours = tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if theirs != ours:
        differing = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise TeacherError(
            f"{teacher_field(spec)}: the teacher's tokenizer is not the student's (baseModel's): "
            f"{len(theirs)} tokens against {len(ours)}, differing in e.g. {differing}; distillation needs the "
            "same tokenizer")
    return directory


def check_teacher_fits(spec: FinetuneSpec, directory: Path, labels: list[str] | None, vocab_size: int) -> None:
    """Before training: the teacher predicts what the student does (the same label set to classify,
    logits over the same vocabulary for causal-lm) and embeds sequences as long as the student's."""
    config = AutoConfig.from_pretrained(directory)
    field = teacher_field(spec)
    if labels is not None:
        theirs = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
        if theirs != labels:
            raise TeacherError(f"{field}: the teacher classifies into {theirs}, the student into {labels} (the "
                               "labels of data.train): distillation needs the same label set")
    elif config.vocab_size != vocab_size:
        raise TeacherError(f"{field}: the teacher predicts over {config.vocab_size} tokens (vocab_size), the "
                           f"student over {vocab_size}: distillation needs the same vocabulary")
    positions = getattr(config, "max_position_embeddings", None)
    length = spec.training.sequence_length
    if positions is not None and length > positions:
        raise TeacherError(f"{field}: training.sequenceLength {length} exceeds the teacher's {positions} positions")


class Teacher:
    """The frozen teacher and the blended loss it makes of the student's output."""

    def __init__(self, spec: FinetuneSpec, directory: Path, device: torch.device):
        loader = AutoModelForSequenceClassification if spec.task == "sequence-classification" else AutoModelForCausalLM
        model = loader.from_pretrained(directory, use_safetensors=True)
        if (directory / ADAPTER_DIR).is_dir():  # a prompt- or prefix-tuned teacher: its base and its adapter
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, directory / ADAPTER_DIR)
        model.config.use_cache = False  # one forward pass per batch: a key/value cache is waste
        model.requires_grad_(False)
        self.model = model.eval().to(device)
        self.settings: DistillSpec = spec.distill_settings()
        self.causal = spec.task == "causal-lm"
        log.info("distilling from a teacher of %.2fM parameters (temperature %g, alpha %g)",
                 sum(p.numel() for p in model.parameters()) / 1e6, self.settings.temperature, self.settings.alpha)

    def loss(self, batch: dict[str, torch.Tensor], student_logits: torch.Tensor,
             task_loss: torch.Tensor) -> torch.Tensor:
        """alpha * T^2 * KL(teacher || student), both at temperature T, + (1 - alpha) * the task loss."""
        with torch.no_grad():
            teacher_logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        kl = soft_kl(student_logits, teacher_logits, self.settings.temperature,
                     batch["labels"] if self.causal else None)
        alpha, temperature = self.settings.alpha, self.settings.temperature
        return alpha * temperature**2 * kl + (1 - alpha) * task_loss


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """The mean KL(teacher || student) of the temperature-softened distributions, in float32: per
    example for a classifier; for a causal LM per predicted token, those the task loss counts
    (`labels`' next tokens that are not IGNORE_INDEX: the responses, not the prompts or padding)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if labels is not None:  # the logits at position i predict token i + 1
        counted = labels[:, 1:] != IGNORE_INDEX
        student, teacher = student[:, :-1][counted], teacher[:, :-1][counted]
        if not len(student):
            return student_logits.sum() * 0.0  # no token to learn from in this batch
    per_row = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return per_row.mean()
