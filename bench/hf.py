"""The Hugging Face `transformers.Trainer` side of the benchmarks: its arguments, read from the job's
TrainingSpec so both trainers do the same work, and its clock."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from kubeforge.spec import TrainingSpec
from kubeforge.trainer import distributed


def hf_training_arguments(training: TrainingSpec, output_dir: str, **extra: Any) -> TrainingArguments:
    """What kubeforge's loop does with `training`, as TrainingArguments: the device it would pick, bf16
    autocast where it would use it, the same batch, AdamW (betas 0.9/0.95), warmup then cosine decay to
    minLrRatio of the peak, clipping, logging interval, torch.compile and activation checkpointing; no
    evaluation, checkpoint or report. `extra` adds or overrides arguments."""
    assert training.lr_schedule == "cosine", "the benchmarks compare cosine schedules only"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arguments: dict[str, Any] = dict(
        output_dir=output_dir, use_cpu=device.type == "cpu",
        bf16=distributed.autocast_dtype(training.precision, device) == torch.bfloat16,
        seed=training.seed, max_steps=training.max_steps, per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps, learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": training.min_lr_ratio},
        weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
        adam_beta1=0.9, adam_beta2=0.95, torch_compile=training.compile, eval_strategy="no", save_strategy="no",
        report_to="none", dataloader_num_workers=0, logging_steps=training.log_interval, disable_tqdm=True,
    )
    if training.activation_checkpointing:  # named only when on: transformers is renaming the argument
        arguments["gradient_checkpointing"] = True
    return TrainingArguments(**{**arguments, **extra})


class StepClock(TrainerCallback):  # type: ignore[misc]
    """time.perf_counter() after each optimizer step that ends a logging interval, and after the last,
    by step. On a GPU the clock waits for the step's kernels: HF's loop does not, until it logs."""

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps[state.global_step] = time.perf_counter()
