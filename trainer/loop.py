"""The training loop: spec in, exported Hugging Face model out, resumable at every checkpoint.

Read `Trainer` top to bottom: `__init__` sets a run up in named steps (resuming from the newest
checkpoint), `train` is the loop, `train_step` one optimizer step. What a checkpoint holds is
checkpoint/state.py's, registered here in one `TrainingState`.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import torch
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from kubeforge.spec import HUB_SCHEME, FinetuneJob, Job, PretrainJob, PretrainSpec, TrainingSpec, export_uri
from kubeforge.status import EarlyStopped, EvalObserver, ExportedModel, Preempted, TrainerResult
from kubeforge.storage import StorageError, open_storage
from kubeforge.trainer import corpus, data, distributed
from kubeforge.trainer.checkpoint import Checkpointer, Restored, UploadReport, export_model, job_identity
from kubeforge.trainer.checkpoint.state import (
    AdaLoraAllocation,
    Progress,
    Rng,
    Stateful,
    TrainingState,
    TrainState,
    Weights,
    saved_micro_batches_per_step,
    saved_tokenizer,
)
from kubeforge.trainer.compression import (
    PRUNED_DIR,
    compression_report,
    prune_model_dir,
    pruning_report,
    quantize_model_dir,
    refuse_uncompressible,
    weights_size,
)
from kubeforge.trainer.distill import Teacher, check_teacher_fits, fetch_teacher
from kubeforge.trainer.flops import training_flops_per_token
from kubeforge.trainer.metrics import ThroughputWindow, TrainerMetrics
from kubeforge.trainer.models import (
    BaseModelError,
    adalora_rank_pattern,
    build_pretrain_model,
    cache_hub_model,
    check_positions,
    dequantized_twin,
    enable_activation_checkpointing,
    fetch_model_dir,
    load_finetune_model,
    merges_on_export,
    quantized_base,
    refuse_unsupported,
    save_for_export,
    task_loss_only,
    trainable_parameters,
)
from kubeforge.trainer.tokenization import ensure_pad_token, from_json, load_tokenizer

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def lr_multiplier(training: TrainingSpec, total_steps: int):  # type: ignore[no-untyped-def]
    """Linear warmup, then cosine or linear decay to minLrRatio of the peak (or constant)."""

    def multiplier(step: int) -> float:
        if step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        if training.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - training.warmup_steps) / max(1, total_steps - training.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if training.lr_schedule == "cosine" else 1 - progress
        return training.min_lr_ratio + (1 - training.min_lr_ratio) * decay

    return multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norms (parameters with fewer than two dimensions)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]


def eval_metrics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], classify: bool,
                 num_labels: int, runtime: distributed.Runtime, dtype: torch.dtype | None,
                 filler: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Loss and perplexity; accuracy and macro F1 for classification. Summed over every rank.

    A sharded model's forward is every rank's at once: given a `filler` batch, a rank with fewer
    batches than another runs it as often as it is short, counting nothing."""
    model.eval()
    loss_sum = weight = 0.0
    counts = torch.zeros(3, max(num_labels, 1), dtype=torch.float64)  # true positives, predicted, actual
    rounds = len(batches) if filler is None else distributed.all_reduce_max(len(batches), runtime)
    with torch.no_grad(), torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(rounds - len(batches)):
            assert filler is not None
            model(**{k: v.to(runtime.device) for k, v in filler.items()})
        for batch in batches:
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            output = model(**batch)
            if classify:
                n = float(len(batch["labels"]))
                predicted = output.logits.argmax(-1).cpu()
                actual = batch["labels"].cpu()
                for label in range(num_labels):
                    counts[0, label] += ((predicted == label) & (actual == label)).sum()
                    counts[1, label] += (predicted == label).sum()
                    counts[2, label] += (actual == label).sum()
            else:
                n = float((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            loss_sum += float(output.loss) * n
            weight += n
    model.train()
    totals = distributed.all_reduce_sum([loss_sum, weight, *counts.flatten().tolist()], runtime)
    loss = totals[0] / max(totals[1], 1.0)
    metrics = {"loss": loss}
    if classify:
        tp, predicted, actual = torch.tensor(totals[2:]).view(3, -1)
        metrics["accuracy"] = float(tp.sum() / actual.sum().clamp(min=1))
        f1 = 2 * tp / (predicted + actual).clamp(min=1)
        metrics["f1"] = float(f1[actual > 0].mean())
    else:
        metrics["perplexity"] = math.exp(min(loss, 50.0))
    return metrics


class Workload(NamedTuple):
    """What a job trains: its tokenizer, data and how its model is built."""

    tokenizer: PreTrainedTokenizerBase
    train_set: data.DataSet
    eval_set: data.DataSet
    labels: list[str] | None  # the class names of a sequence-classification job
    #: The model for a run of this many optimizer steps (AdaLoRA schedules its rank budget over
    #: them), whole and on CPU; built again to export a sharded model's gathered weights through,
    #: and, full_precision=True, a QLoRA model's adapters.
    build: Callable[..., torch.nn.Module]
    #: method distill: the teacher's model directory, checked against the student's tokenizer and labels.
    teacher_dir: Path | None = None


def pretrain_workload(job: PretrainJob, saved_tokenizer: str | None, corpus_cache: str, runtime: distributed.Runtime,
                      scratch: Path, metrics: TrainerMetrics, progress: bool) -> Workload:
    """A new model; the corpus prepared into token shards (or found prepared), with tokenizer.uri's
    tokenizer, the one a checkpoint saved, or one trained on a sample of the corpus."""
    spec = job.spec
    files = corpus.source_files(spec)
    tokenizer: PreTrainedTokenizerBase
    if spec.tokenizer.uri is not None:
        tokenizer = load_tokenizer(spec.tokenizer.uri, spec.s3, scratch)
    elif saved_tokenizer is not None:
        tokenizer = from_json(saved_tokenizer)
    else:
        tokenizer = corpus.trained_tokenizer(spec, files, corpus_cache, runtime.rank, runtime.world_size, scratch)
    prepared = prepare_corpus(spec, tokenizer, files, corpus_cache, runtime, scratch, metrics, progress)
    sequence_length = spec.training.sequence_length
    train_set, eval_set = prepared.splits(sequence_length, spec.data.eval_fraction)

    def build(total_steps: int) -> torch.nn.Module:  # a pretrained model is the same for any run length
        return build_pretrain_model(spec.model, tokenizer, sequence_length)

    # A pretraining sequence is its own labels (see data.take).
    return Workload(tokenizer, {"input_ids": train_set}, {"input_ids": eval_set}, None, build)


def prepare_corpus(spec: PretrainSpec, tokenizer: PreTrainedTokenizerBase, files: list[corpus.SourceFile],
                   cache: str, runtime: distributed.Runtime, scratch: Path, metrics: TrainerMetrics,
                   progress: bool) -> corpus.PreparedCorpus:
    """corpus.prepare, its tokens counted in the metrics and, on `kubeforge run`, on a progress bar."""
    from tqdm import tqdm

    bar = tqdm(desc="preparing the corpus", unit="tok", unit_scale=True, disable=not (progress and runtime.is_main),
               dynamic_ncols=True)

    def prepared(tokens: int) -> None:
        metrics.corpus_tokens_prepared.inc(tokens)
        bar.update(tokens)

    metrics.corpus_preparing.set(1)
    try:
        return corpus.prepare(spec, tokenizer, files, cache, runtime.rank, runtime.world_size, scratch, prepared)
    finally:
        metrics.corpus_preparing.set(0)
        bar.close()


def finetune_workload(job: FinetuneJob, base_model_uri: str | None, scratch: Path,
                      teacher_uri: str | None = None) -> Workload:
    """The base model (with the method's peft adapters) and its tokenizer; a distilling job's
    teacher, refused before any training unless it shares the tokenizer and labels."""
    if base_model_uri is None:
        raise BaseModelError("baseModel: no base model URI was resolved for this job")
    refuse_unsupported(job.spec, job.spec.training.parallelism)
    from transformers import AutoConfig, AutoTokenizer

    base_dir = fetch_model_dir(base_model_uri, job.spec.s3, scratch)
    check_positions(job.spec, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ensure_pad_token(tokenizer)
    distilling = job.spec.method == "distill"
    teacher_dir = fetch_teacher(job.spec, teacher_uri, job.spec.s3, scratch, tokenizer) if distilling else None
    if job.spec.data.chat_template is not None:
        tokenizer.chat_template = job.spec.data.chat_template  # also what the export is saved with
    sequence_length = job.spec.training.sequence_length
    labels: list[str] | None = None
    if job.spec.task == "sequence-classification":
        train_set, eval_set, labels = data.classification_sets(job.spec.data, job.spec.s3, tokenizer, sequence_length)
    else:
        train_set, eval_set = data.instruction_sets(job.spec.data, job.spec.s3, tokenizer, sequence_length)
    if teacher_dir is not None:
        check_teacher_fits(job.spec, teacher_dir, labels, AutoConfig.from_pretrained(base_dir).vocab_size)
    build = partial(load_finetune_model, job.spec, base_dir, tokenizer, labels)
    return Workload(tokenizer, train_set, eval_set, labels, build, teacher_dir)


class Trainer:
    """One job's run: `__init__` builds it (restoring the newest checkpoint), `train` runs it."""

    def __init__(self, job: Job, runtime: distributed.Runtime, metrics: TrainerMetrics, stop: distributed.GracefulStop,
                 checkpoint_root: str, base_model_uri: str | None, progress: bool, scratch: Path, corpus_cache: str,
                 teacher_uri: str | None = None):
        # The steps run in the order the seeded RNG is drawn from (tokenizer, data, model weights)
        # before a checkpoint's RNG state replaces it; the optimizer needs the model sharded first.
        self.job, self.runtime, self.training = job, runtime, job.spec.training
        self.checkpoint_root, self.progress, self.metrics, self.stop = checkpoint_root, progress, metrics, stop
        self.corpus_cache = corpus_cache
        random.seed(self.training.seed)
        torch.manual_seed(self.training.seed)
        self.storage = open_storage(checkpoint_root, job.spec.s3)
        self.sharded = self.training.parallelism == "fsdp"  # checkpoints are DCP shards, written by every rank
        self.checkpointer = self._checkpointer()
        restored = self._newest_checkpoint(scratch)
        self.teacher_uri = teacher_uri
        self._set_workload(restored, base_model_uri, scratch)
        self._plan_steps(restored)
        self.rebuild = partial(self.build_model, self.total_steps)
        #: The model itself, sharded in place under fsdp: what evaluates, exports and checkpoints.
        self.raw_model = self.rebuild()
        refuse_uncompressible(job, self.raw_model)
        self.trainable_parameters = trainable_parameters(self.raw_model)
        metrics.trainable_parameters.set(self.trainable_parameters)
        self._place_model()
        #: method distill: the frozen teacher, on the student's device; no part of the optimizer or checkpoint.
        self.teacher = (Teacher(job.spec, self.teacher_dir, runtime.device)
                        if isinstance(job, FinetuneJob) and self.teacher_dir else None)
        self._set_optimizer()
        self.state = TrainState()
        states: dict[str, Stateful] = {
            "scheduler": self.scheduler, "progress": Progress(self.state, self.batches, runtime.world_size,
                                                              self.accumulation),
            "rng": Rng(runtime.device)}
        #: AdaLoRA's rank allocation, which train_step moves once per optimizer step (method adalora only).
        self.adalora = AdaLoraAllocation(self.raw_model) if self._method == "adalora" else None
        if self.adalora is not None:
            states["adalora"] = self.adalora
        trained_tokenizer = isinstance(job, PretrainJob) and job.spec.tokenizer.uri is None
        weights = Weights(self.raw_model, self.optimizer, self.sharded, trainable_only=self._quantized_base is not None)
        self.checkpoint_state = TrainingState(weights, states,
                                              self.tokenizer if trained_tokenizer else None)
        if restored:
            self.checkpoint_state.restore(restored)
        self.resumed_from = self.state.step
        self.metrics.resumed_from_step.set(self.resumed_from)
        self._compile()
        self._set_throughput_window()
        self.train_loss: float | None = None  # the mean over the last logging window
        #: Called with each evaluation's step and metrics during training; True stops the run (a sweep's pruner).
        self.on_eval: EvalObserver | None = None

    @property
    def _method(self) -> str | None:
        """A FinetuneJob's method (full, lora, adalora...); None for a PretrainJob."""
        return self.job.spec.method if isinstance(self.job, FinetuneJob) else None

    @property
    def _quantized_base(self) -> Literal["4bit", "8bit"] | None:
        """lora.quantizeBase of a QLoRA job; None for every other."""
        return quantized_base(self.job.spec) if isinstance(self.job, FinetuneJob) else None

    def _checkpointer(self) -> Checkpointer:
        checkpointer = Checkpointer(
            self.storage, keep=self.job.spec.checkpoint.keep, spec_hash=self.job.spec_hash(),
            rank=self.runtime.rank, job=job_identity(self.job), on_uploaded=self._uploaded,
            group=distributed.checkpoint_group(self.runtime) if self.sharded else None,
            on_failed=lambda _: self.metrics.checkpoint_failures.inc())
        self.metrics.count_uploads_pending(checkpointer.uploads_pending)
        return checkpointer

    def _set_workload(self, restored: Restored | None, base_model_uri: str | None, scratch: Path) -> None:
        """Tokenizer, data and the model, as the job's kind builds them; its batches on this rank."""
        training, runtime = self.training, self.runtime
        if isinstance(self.job, PretrainJob):
            workload = pretrain_workload(self.job, saved_tokenizer(restored), self.corpus_cache, runtime, scratch,
                                         self.metrics, self.progress)
        else:
            assert isinstance(self.job, FinetuneJob)
            workload = finetune_workload(self.job, base_model_uri, scratch, self.teacher_uri)
        self.tokenizer, self.labels, self.build_model = workload.tokenizer, workload.labels, workload.build
        self.teacher_dir = workload.teacher_dir
        self.batches = data.Batches(workload.train_set, training.batch_size, training.seed, runtime.rank,
                                    runtime.world_size, training.group_by_length, data.pad_multiple(runtime.device))
        self.eval_batches = data.eval_batches(workload.eval_set, training.batch_size, training.eval_batches,
                                              runtime.rank, runtime.world_size)
        self.eval_filler = data.eval_batches(workload.eval_set, training.batch_size, 1, 0, 1)[0]
        #: Every rank's eval batches: what rank 0 alone evaluates the exported models on (export.quantize, .prune).
        self.export_eval_batches = data.eval_batches(workload.eval_set, training.batch_size, training.eval_batches,
                                                     0, 1) if self.job.spec.export.compresses() else []

    def _plan_steps(self, restored: Restored | None) -> None:
        """Micro-batches per step, and the optimizer steps the job trains for (maxSteps or epochs)."""
        self.accumulation = self._accumulation(saved_micro_batches_per_step(restored))
        self.total_steps: int = self.training.max_steps or max(1, math.ceil(
            self.training.epochs * self.batches.per_epoch / self.accumulation))  # type: ignore[operator]
        self.metrics.total_steps.set(self.total_steps)

    def _place_model(self) -> None:
        """The model on its device, ready to train, and wrapped for the data-parallel step."""
        model, training = self.raw_model, self.training
        model.to(self.runtime.device)
        # Training needs no key/value cache; without one, packed rows get their per-pair attention mask.
        self.model_config: Any = cast(Any, getattr(model, "config", None))  # a transformers model's config
        self.use_cache = getattr(self.model_config, "use_cache", None)
        if self.use_cache is not None:
            self.model_config.use_cache = False
        if training.activation_checkpointing:  # before sharding: it wraps the model's own layers
            enable_activation_checkpointing(model)
        self.dtype = distributed.autocast_dtype(training.precision, self.runtime.device)
        #: The DDP or FSDP module: what synchronises gradients across ranks.
        self.distributed_model = distributed.wrap(model, training.parallelism, self.runtime, self.dtype)
        #: What the training step calls: the distributed model, compiled when asked (see _compile).
        self.step_model = self.distributed_model

    def _set_optimizer(self) -> None:
        training = self.training
        # The fused kernel: one launch for all parameters instead of a loop over them (CPU and CUDA).
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, training.weight_decay),
                                           lr=training.learning_rate, betas=(0.9, 0.95),
                                           fused=self.runtime.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(training, self.total_steps))

    def _compile(self) -> None:
        if self.training.compile:
            # DDP's and FSDP's own hooks stay outside the graph; raw_model, which evaluates, exports
            # and checkpoints, keeps its plain parameter names.
            self.step_model = cast(torch.nn.Module, torch.compile(self.step_model))

    def _set_throughput_window(self) -> None:
        config = self.model_config
        flops_per_token = training_flops_per_token(sum(p.numel() for p in self.raw_model.parameters()),
                                                   getattr(config, "num_hidden_layers", 0),
                                                   getattr(config, "hidden_size", 0), self.training.sequence_length)
        self.window = ThroughputWindow(self.metrics, self.runtime.device, flops_per_token,
                                       bf16=self.dtype == torch.bfloat16)

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainerResult:
        """Train to total_steps, evaluating, logging and checkpointing at their intervals; then export."""
        training, checkpoint_interval = self.training, self.job.spec.checkpoint.interval_steps
        if self.state.step == 0:
            self.evaluate()  # the starting point that later evaluations are judged against
        if self.runtime.is_main:
            log.info("training %s/%s %s: steps %d..%d on %s x%d", self.job.namespace, self.job.name, self.job.kind,
                     self.state.step, self.total_steps, self.runtime.device.type, self.runtime.world_size)
        bar = self._progress_bar()
        self.window.restart()
        self.raw_model.train()
        while self.state.step < self.total_steps:
            self.train_step()
            step, last = self.state.step, self.state.step == self.total_steps
            bar.update(1)
            if step % training.log_interval == 0 or last:
                self.log_window(bar)
            if step % training.eval_interval == 0 or last:
                evaluated = self.evaluate()
                if not last and self.on_eval is not None and self.on_eval(step, evaluated):
                    self.checkpointer.close()
                    raise EarlyStopped(f"stopped at step {step} of {self.total_steps} by its evaluation's observer")
            # Every rank asks, every step: all stop at the same step, and the last step always finishes the job.
            stopping = not last and self.stop.agreed(self.runtime)
            if step % checkpoint_interval == 0 or last or stopping:
                self.save_checkpoint(synchronous=stopping)
            if stopping:
                self._stop_preempted()
        bar.close()
        ranks = adalora_rank_pattern(self.raw_model)
        if ranks is not None:  # on every rank: under ddp they must agree (see train_step)
            log.info("AdaLoRA's ranks: %s", ", ".join(f"{name}={rank}" for name, rank in ranks.items()))

        # A run resumed from its final checkpoint trains no step: it still evaluates what it exports.
        history = self.state.eval_history
        final = history[-1] if history and history[-1]["step"] == self.state.step else self.evaluate()
        self.checkpointer.close()
        if self.runtime.is_main and self.checkpointer.last_error is not None:
            # The export must never stand for a model whose last checkpoint did not commit.
            raise StorageError(f"the final checkpoint could not be written: {self.checkpointer.last_error}")
        result = self.result(final)
        exported = self.whole_model()
        if exported is not None:
            self.export(result, exported)
        return result

    def train_step(self) -> None:
        """One optimizer step over self.accumulation micro-batches; across ranks, gradients are
        synchronised on the last micro-batch only."""
        accumulation = self.accumulation
        device, dtype = self.runtime.device, self.dtype
        for k in range(accumulation):
            micro = self._next_batch()
            batch = micro.inputs
            last = k == accumulation - 1
            sync = distributed.gradient_sync(self.distributed_model, last)  # not the compiled one
            with sync, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                output = self.step_model(**batch)
                loss = output.loss if self.teacher is None else self.teacher.loss(batch, output.logits, output.loss)
                loss = loss / accumulation
                loss.backward()
            self.window.count_micro_batch(loss, micro.real_tokens, micro.computed_tokens, len(batch["input_ids"]))
        if self.training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora is not None:
            # Scores come from the gradients, which DDP has all-reduced at this step's last micro-batch
            # (the earlier ones' accumulated locally and reduced with it), and from the weights, the
            # same on every rank: every rank scores alike and masks the same singular values.
            self.adalora.allocate(self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.window.count_step(self.state.step)

    def _next_batch(self) -> data.MicroBatch:
        """The next micro-batch, on the device; the time it takes counts as waiting for data."""
        fetch_started = time.perf_counter()
        micro = self.batches[self.state.micro_batch]
        device = self.runtime.device
        # On a GPU from pinned memory: the host queues the forward pass while the copy runs, not after it.
        pinned = device.type == "cuda"
        micro = replace(micro, inputs={name: (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
                                       for name, t in micro.inputs.items()})
        self.metrics.data_wait.inc(time.perf_counter() - fetch_started)
        self.state.micro_batch += 1
        return micro

    def log_window(self, bar: tqdm[Any]) -> None:
        """Close the logging window: its loss and throughput go to the metrics, the bar and the log."""
        learning_rate = float(self.scheduler.get_last_lr()[0])
        report = self.window.close(learning_rate)
        self.train_loss = report.mean_loss
        self.state.tokens_seen += report.tokens
        if not math.isfinite(report.mean_loss):
            log.error("loss is %s at step %d", report.mean_loss, self.state.step)
        bar.set_postfix(loss=f"{report.mean_loss:.3f}")
        if self.runtime.is_main and not self.progress:
            log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s, computed %.2fx the real tokens", self.state.step,
                     self.total_steps, report.mean_loss, learning_rate, report.tokens_per_second,
                     report.padding_ratio)

    def _progress_bar(self) -> tqdm[Any]:
        """A progress bar on rank 0 when asked for (`kubeforge run`), else a silent one."""
        from tqdm import tqdm
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its shard-writing bars would interleave with ours
        return tqdm(total=self.total_steps, initial=self.state.step,
                    disable=not (self.progress and self.runtime.is_main),
                    desc=self.job.name, unit="step", dynamic_ncols=True)

    # -- evaluation and export ---------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the eval split; the result joins the history (checkpointed) and the metrics."""
        lockstep = self.eval_filler if isinstance(self.raw_model, FSDPModule) else None
        with task_loss_only(self.raw_model):
            result = eval_metrics(self.raw_model, self.eval_batches, self.labels is not None,
                                  len(self.labels or []), self.runtime, self.dtype, lockstep)
        self.state.eval_history.append({"step": self.state.step, **result})
        self.metrics.eval_loss.set(result["loss"])
        self.metrics.eval_step.set(self.state.step)
        for name, value in result.items():
            self.metrics.eval_metric(name, value)
        if self.runtime.is_main:
            log.info("eval at step %d: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def result(self, final_eval: dict[str, float]) -> TrainerResult:
        """The run's result: returned, exported as result.json, summarised for the operator."""
        return TrainerResult(
            job=self.job.name, namespace=self.job.namespace, kind=self.job.kind, step=self.state.step,
            total_steps=self.total_steps, resumed_from_step=self.resumed_from, tokens_seen=self.state.tokens_seen,
            train_loss=self.train_loss, final_eval={k: v for k, v in final_eval.items() if k != "step"},
            eval_history=self.state.eval_history, device=self.runtime.device.type,
            workers=self.runtime.world_size, checkpoint_uri=self.checkpoint_root,
            export_uri=export_uri(self.checkpoint_root), labels=self.labels,
            export_format=None if self._method is None else
            "merged" if merges_on_export(self.raw_model) else "base+adapter",
            adapter_ranks=adalora_rank_pattern(self.raw_model),
            teacher_uri=self.teacher_uri if self.teacher is not None else None,
            trainable_parameters=self.trainable_parameters)

    def whole_model(self) -> torch.nn.Module | None:
        """The trained model whole, on rank 0 (None on the others): a sharded one's full weights are
        gathered (every rank takes part) into the same model built again on CPU."""
        if not isinstance(self.raw_model, FSDPModule):
            return self.raw_model if self.runtime.is_main else None
        weights = get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.runtime.is_main:
            return None
        whole = self.rebuild()
        whole.load_state_dict(weights)
        return whole

    def export(self, result: TrainerResult, model: torch.nn.Module) -> None:
        """The model in Hugging Face format (adapters merged, or beside their base), with its
        tokenizer, job and result."""
        started = time.perf_counter()
        if self.use_cache is not None:
            self.model_config.use_cache = self.use_cache  # the exported model generates with its cache
        quantize = self._quantized_base
        if quantize is not None:  # QLoRA: the adapters merge into full-precision weights, not bitsandbytes'
            model = dequantized_twin(model, self.rebuild(full_precision=True))
        save: Callable[[Path], Any] = partial(save_for_export, model)
        if self.job.spec.export.compresses():
            save = partial(self._save_compressed, save, result)
        export_model(self.storage, save, self.tokenizer,
                     yaml.safe_dump(self.job.to_manifest(), sort_keys=False), result, self.job.spec_hash())
        log.info("exported the model to %s in %.1fs", result.export_uri, time.perf_counter() - started)

    def _save_compressed(self, save_full: Callable[[Path], Any], result: TrainerResult, root: Path) -> None:
        """export.quantize and export.prune: the full model saved (into root, or aside when not kept),
        quantized into root/QUANTIZE (or root itself) and pruned into root/pruned, each evaluated on the
        eval set beside the full one; result.compression and result.pruning say how they compare."""
        settings = self.job.spec.export
        keep = settings.keep_full_precision
        model_class = self._export_model_class()
        with tempfile.TemporaryDirectory(prefix="kubeforge-full-") as aside:
            full_dir = root if keep else Path(aside)
            save_full(full_dir)
            full = self._exported_model(full_dir, model_class, result.export_uri if keep else None)
            if settings.quantize is not None:
                quantize = settings.quantize
                quantized_dir = root / quantize if keep else root
                quantize_model_dir(full_dir, quantized_dir, quantize, model_class)
                if keep:
                    self.tokenizer.save_pretrained(quantized_dir)  # a whole model directory of its own
                quantized = self._exported_model(quantized_dir, model_class,
                                                 f"{result.export_uri}/{quantize}" if keep else result.export_uri)
                result.compression = compression_report(quantize, full, quantized)
                log.info("export.quantize: %s", result.compression.summary)
            if settings.prune is not None:
                pruned_dir = root / PRUNED_DIR
                sparsity = prune_model_dir(full_dir, pruned_dir, settings.prune.sparsity, model_class)
                self.tokenizer.save_pretrained(pruned_dir)
                pruned = self._exported_model(pruned_dir, model_class, f"{result.export_uri}/{PRUNED_DIR}")
                result.pruning = pruning_report(sparsity, full, pruned)
                log.info("export.prune: %s", result.pruning.summary)

    def _export_model_class(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        return AutoModelForSequenceClassification if self.labels is not None else AutoModelForCausalLM

    def _exported_model(self, directory: Path, model_class: Any, uri: str | None) -> ExportedModel:
        """An exported model directory, loaded back as a user would and evaluated on every eval batch."""
        model = model_class.from_pretrained(directory).to(self.runtime.device)
        alone = replace(self.runtime, rank=0, world_size=1)  # rank 0 alone: no collective
        metrics = eval_metrics(model, self.export_eval_batches, self.labels is not None, len(self.labels or []),
                               alone, self.dtype)
        return ExportedModel(uri=uri, size_bytes=weights_size(directory), eval=metrics)

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, synchronous: bool = False) -> None:
        """Snapshot the state and upload it, in the background unless `synchronous` (a graceful stop:
        the commit must land before the process exits). Under ddp every rank holds the same weights
        and rank 0 writes them; a sharded checkpoint is every rank's, each writing its shard."""
        if self.runtime.is_main or self.sharded:
            blocked = self.checkpointer.save(self.state.step, self.checkpoint_state.files(),
                                             model_shape=self.checkpoint_state.weights.shape, synchronous=synchronous)
            self.metrics.checkpoint_blocked.observe(blocked)

    def _stop_preempted(self) -> None:
        """After SIGTERM's checkpoint: exit as preempted, or as failed if that checkpoint did not commit."""
        step = self.state.step
        if self.runtime.is_main and self.checkpointer.last_error is not None:
            raise StorageError(f"stopped on SIGTERM at step {step}, but its checkpoint could not be "
                               f"written: {self.checkpointer.last_error}")
        self.checkpointer.close()
        raise Preempted(f"stopped on SIGTERM at step {step} of {self.total_steps}, its checkpoint committed")

    def _newest_checkpoint(self, scratch: Path) -> Restored | None:
        """The newest of this job's checkpoints that verifies; without one, spec.checkpoint.warmStartFrom's
        newest (its weights only); else None, to start afresh."""
        spec = self.job.spec
        restored = self.checkpointer.resume(scratch / "resume")
        if restored:
            self.metrics.last_checkpoint_step.set(restored.checkpoint.step)
            if self.runtime.is_main:
                log.info("resuming from checkpoint step %d at %s/%s", restored.checkpoint.step, self.storage.uri,
                         restored.checkpoint.prefix)
        elif spec.checkpoint.warm_start_from:
            restored = self.checkpointer.warm_start(open_storage(spec.checkpoint.warm_start_from, spec.s3),
                                                    scratch / "warm")
            if self.runtime.is_main:
                log.info("warm start from the weights of %s/%s", restored.uri, restored.checkpoint.prefix)
        return restored

    def _accumulation(self, saved_per_step: int | None) -> int:
        """Micro-batches per optimizer step on each rank: the spec's; resumed on another number of
        ranks, as many as keep a step's batch across all ranks what it was, so the run goes on as it
        would have (with two ranks' micro-batches of a step trained one after the other by one)."""
        spec, world = self.training.gradient_accumulation_steps, self.runtime.world_size
        if saved_per_step is None:
            return spec
        if saved_per_step % world:
            if self.runtime.is_main:
                log.warning("resumed on %d processes: a step's %d micro-batches do not divide among them; each "
                            "step now trains %d instead", world, saved_per_step, spec * world)
            return spec
        return saved_per_step // world

    def _uploaded(self, report: UploadReport) -> None:
        self.metrics.checkpoint_duration.observe(report.seconds)
        self.metrics.checkpoint_bytes.inc(report.bytes_written)
        self.metrics.last_checkpoint_step.set(report.step)


def hub_base_model(job: Job, uri: str, cache: str, runtime: distributed.Runtime, scratch: Path) -> str:
    """The job storage's copy of an hf:// base model: rank 0 fetches it if it is not there yet while
    the other ranks, of every pod, wait, so the Hub is asked once."""
    if runtime.is_main:
        cached = cache_hub_model(uri, cache, job.spec.s3, scratch)
    if runtime.world_size > 1:
        torch.distributed.barrier()
    if not runtime.is_main:
        cached = cache_hub_model(uri, cache, job.spec.s3, scratch)  # committed by now: only read
    return cached


def train(job: Job, *, checkpoint_root: str, base_model_uri: str | None = None,
          progress: bool = False, base_model_cache: str | None = None, corpus_cache: str | None = None,
          teacher_uri: str | None = None, on_eval: EvalObserver | None = None) -> TrainerResult:
    """Run one job to completion (resuming from its newest checkpoint) and return its result; an
    hf:// base model is kept under base_model_cache, a PretrainJob's prepared corpus under
    corpus_cache (by default, each next to the checkpoints); a distilling job learns from the
    model at teacher_uri. `on_eval` sees each evaluation during training and may stop the run
    (EarlyStopped) by returning True."""
    resources = job.spec.resources
    runtime = distributed.start(resources.gpus_per_worker, resources.allow_cpu_fallback)
    metrics = TrainerMetrics(job.name, job.namespace, job.kind, runtime.rank)
    try:
        metrics.serve(job.spec.metrics.port and job.spec.metrics.port + runtime.local_rank)
        with distributed.GracefulStop() as stop, tempfile.TemporaryDirectory(prefix="kubeforge-train-") as scratch:
            if base_model_uri is not None and base_model_uri.startswith(HUB_SCHEME):
                base_model_uri = hub_base_model(job, base_model_uri,
                                                base_model_cache or f"{checkpoint_root.rstrip('/')}/base-models",
                                                runtime, Path(scratch))
            trainer = Trainer(job, runtime, metrics, stop, checkpoint_root, base_model_uri, progress, Path(scratch),
                              corpus_cache or f"{checkpoint_root.rstrip('/')}/corpora", teacher_uri)
            trainer.on_eval = on_eval
            return trainer.train()
    finally:
        metrics.close()  # `kubeforge run` of several jobs: the next one serves on the same port
        distributed.stop()
