"""The training loop: spec in, exported Hugging Face model out, resumable at every checkpoint."""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from kubeforge.spec import FinetuneJob, Job, PretrainJob, S3Spec, TrainingSpec, export_uri
from kubeforge.status import Preempted
from kubeforge.storage import StorageError, download_tree, open_storage
from kubeforge.trainer import data as datasets
from kubeforge.trainer import distributed
from kubeforge.trainer.checkpoint import (
    MANIFEST,
    Checkpointer,
    UploadReport,
    export_model,
    fetch_verified,
    job_identity,
    read_manifest,
)
from kubeforge.trainer.flops import model_flops_utilization, peak_flops, training_flops_per_token
from kubeforge.trainer.metrics import TrainerMetrics
from kubeforge.trainer.models import build_pretrain_model, load_finetune_model, unwrap_for_export
from kubeforge.trainer.tokenization import ensure_pad_token, from_json, train_tokenizer

if TYPE_CHECKING:
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


def fetch_model_dir(uri: str, s3: S3Spec | None, scratch: Path) -> Path:
    """A local Hugging Face model directory for a base model URI (local directory or S3 prefix).

    A kubeforge export is fetched as its manifest lists and verified against it; another model
    directory is fetched whole. Either way its weights must be safetensors: a pickled
    pytorch_model.bin can run code when loaded."""
    local = Path(uri.removeprefix("file://"))
    if not uri.startswith("s3://") and local.is_dir():
        if not (local / "config.json").is_file():
            raise datasets.DataError(f"baseModel: {uri} has no config.json: not a Hugging Face model directory")
        _require_safetensors(local, uri)
        return local
    storage = open_storage(uri, s3)
    keys = storage.list()
    if "config.json" not in keys:
        raise datasets.DataError(f"baseModel: no Hugging Face model (config.json) found at {uri}")
    target = scratch / "base-model"
    if MANIFEST in keys:
        manifest = read_manifest(storage, "")
        if manifest is None:
            raise StorageError(f"baseModel.uri: {uri} has a manifest that does not match its files: "
                               "refusing to use it")
        fetch_verified(storage, "", manifest, target, field="baseModel.uri")
    else:
        download_tree(storage, "", target, field="baseModel.uri")
    _require_safetensors(target, uri)
    return target


def _require_safetensors(model_dir: Path, uri: str) -> None:
    if not any(model_dir.glob("*.safetensors")):
        raise datasets.DataError(
            f"baseModel: {uri} has no .safetensors weights; kubeforge does not load pickled weights "
            "(pytorch_model.bin) because loading them can run code: save the model with "
            "save_pretrained(..., safe_serialization=True)")


def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], classify: bool,
             num_labels: int, runtime: distributed.Runtime, dtype: torch.dtype | None) -> dict[str, float]:
    """Loss and perplexity; accuracy and macro F1 for classification. Summed over every rank."""
    model.eval()
    loss_sum = weight = 0.0
    counts = torch.zeros(3, max(num_labels, 1), dtype=torch.float64)  # true positives, predicted, actual
    with torch.no_grad(), torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None):
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
                n = float((batch["labels"][:, 1:] != datasets.IGNORE_INDEX).sum())
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


def train(job: Job, *, checkpoint_root: str, base_model_uri: str | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Run one job to completion (resuming from its newest checkpoint) and return its result."""
    resources = job.spec.resources
    runtime = distributed.start(resources.gpus_per_worker, resources.allow_cpu_fallback)
    metrics = TrainerMetrics(job.name, job.namespace, job.kind, runtime.rank)
    try:
        metrics.serve(job.spec.metrics.port and job.spec.metrics.port + runtime.local_rank)
        with distributed.GracefulStop() as stop, tempfile.TemporaryDirectory(prefix="kubeforge-train-") as scratch:
            return _train(job, runtime, metrics, stop, checkpoint_root, base_model_uri, progress, Path(scratch))
    finally:
        metrics.close()
        distributed.stop()


def _train(job: Job, runtime: distributed.Runtime, metrics: TrainerMetrics, stop: distributed.GracefulStop,
           checkpoint_root: str, base_model_uri: str | None, progress: bool, scratch: Path) -> dict[str, Any]:
    spec, training = job.spec, job.spec.training
    random.seed(training.seed)
    torch.manual_seed(training.seed)

    storage = open_storage(checkpoint_root, spec.s3)

    def uploaded(report: UploadReport) -> None:
        metrics.checkpoint_duration.observe(report.seconds)
        metrics.checkpoint_bytes.inc(report.bytes_written)
        metrics.last_checkpoint_step.set(report.step)

    checkpointer = Checkpointer(storage, keep=spec.checkpoint.keep, spec_hash=job.spec_hash(),
                                rank=runtime.rank, job=job_identity(job), on_uploaded=uploaded,
                                on_failed=lambda _: metrics.checkpoint_failures.inc())
    metrics.count_uploads_pending(checkpointer.uploads_pending)
    resume_from = checkpointer.resume(scratch / "resume")
    if resume_from:
        metrics.last_checkpoint_step.set(resume_from.checkpoint.step)
        if runtime.is_main:
            log.info("resuming from checkpoint step %d at %s/%s", resume_from.checkpoint.step, storage.uri,
                     resume_from.checkpoint.prefix)
    elif spec.checkpoint.warm_start_from:
        resume_from = checkpointer.warm_start(open_storage(spec.checkpoint.warm_start_from, spec.s3), scratch / "warm")
        if runtime.is_main:
            log.info("warm start from the weights of %s/%s", resume_from.uri, resume_from.checkpoint.prefix)
    restored = resume_from.files if resume_from else {}

    # -- tokenizer, data and model -------------------------------------------------------------
    L = training.sequence_length
    labels: list[str] | None = None
    if isinstance(job, PretrainJob):
        field = spec.data.text_field
        train_records, eval_records = datasets.load_splits(spec.data, spec.s3, field)
        train_texts = [str(t) for t in datasets.field_values(train_records, field, "textField", "data.train")]
        eval_texts = [str(t) for t in datasets.field_values(eval_records, field, "textField", "data.eval")]
        tokenizer: PreTrainedTokenizerBase = (from_json(restored["tokenizer.json"].decode()) if restored
                                              else train_tokenizer(train_texts, job.spec.tokenizer))
        train_set = datasets.pack_texts(train_texts, tokenizer, L, "data.train")
        eval_set = datasets.pack_texts(eval_texts, tokenizer, L, "data.eval")
        model = build_pretrain_model(job.spec.model, tokenizer, L)
    else:
        assert isinstance(job, FinetuneJob)
        if base_model_uri is None:
            raise datasets.DataError("baseModel: no base model URI was resolved for this job")
        from transformers import AutoTokenizer

        base_dir = fetch_model_dir(base_model_uri, spec.s3, scratch)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        ensure_pad_token(tokenizer)
        data = job.spec.data
        if job.spec.task == "sequence-classification":
            train_records, eval_records = datasets.load_splits(data, spec.s3, data.text_field)
            label_values = datasets.field_values(train_records, data.label_field, "labelField", "data.train")
            labels = datasets.label_names(label_values)
            index = {name: i for i, name in enumerate(labels)}

            def encode(records: list[dict[str, Any]], what: str) -> dict[str, torch.Tensor]:
                texts = datasets.field_values(records, data.text_field, "textField", what)
                values = [str(v) for v in datasets.field_values(records, data.label_field, "labelField", what)]
                unknown = sorted(set(values) - set(index))
                if unknown:
                    raise datasets.DataError(f"{what}: labels {unknown} never appear in data.train")
                return datasets.classification_examples(texts, [index[v] for v in values], tokenizer, L)

            train_set, eval_set = encode(train_records, "data.train"), encode(eval_records, "data.eval")
        else:
            train_records, eval_records = datasets.load_splits(data, spec.s3, data.prompt_field)

            def encode_pairs(records: list[dict[str, Any]], what: str, pack: bool) -> dict[str, torch.Tensor]:
                prompts = [str(p) for p in datasets.field_values(records, data.prompt_field, "promptField", what)]
                answers = [str(a) for a in datasets.field_values(records, data.response_field, "responseField", what)]
                examples = datasets.packed_sft_examples if pack else datasets.sft_examples
                return examples(prompts, answers, tokenizer, L)

            # Eval stays one pair per row: its loss is comparable with and without packing.
            train_set = encode_pairs(train_records, "data.train", data.packing)
            eval_set = encode_pairs(eval_records, "data.eval", False)
        model = load_finetune_model(job.spec, base_dir, tokenizer, labels)

    classify = labels is not None
    batches = datasets.Batches(train_set, training.batch_size, training.seed, runtime.rank, runtime.world_size,
                               group_by_length=training.group_by_length)
    eval_batches = datasets.eval_batches(eval_set, training.batch_size, training.eval_batches,
                                         runtime.rank, runtime.world_size)
    accumulation = training.gradient_accumulation_steps
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * batches.per_epoch / accumulation))  # type: ignore[operator]
    metrics.total_steps.set(total_steps)

    model.to(runtime.device)  # type: ignore[arg-type]  # transformers types .to through a decorator
    # Training needs no key/value cache; without one, packed rows get their per-pair attention mask.
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    # The fused kernel: one launch for all parameters instead of a loop over them (CPU and CUDA).
    optimizer = torch.optim.AdamW(param_groups(model, training.weight_decay), lr=training.learning_rate,
                                  betas=(0.9, 0.95), fused=runtime.device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(training, total_steps))
    step = micro_batch = tokens_seen = 0
    history: list[dict[str, Any]] = []
    if resume_from:
        checkpointer.check_model(resume_from, model.state_dict())
        model.load_state_dict(restored["model.pt"])
    if resume_from and not resume_from.warm_start:
        state = restored["state.pt"]
        optimizer.load_state_dict(restored["optimizer.pt"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if runtime.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
        step, micro_batch, tokens_seen = state["step"], state["micro_batch"], state["tokens_seen"]
        history = state["eval_history"]
    resumed_from = step
    metrics.resumed_from_step.set(resumed_from)
    wrapped = (DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                       else None) if runtime.distributed else model)
    dtype = distributed.autocast_dtype(training.precision, runtime.device)
    config = getattr(model, "config", None)
    flops_per_token = training_flops_per_token(sum(p.numel() for p in model.parameters()),
                                               getattr(config, "num_hidden_layers", 0),
                                               getattr(config, "hidden_size", 0), L)
    peak = None  # MFU and GPU memory exist only on a GPU, and MFU only on one in the table of peaks
    if runtime.device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(runtime.device), bf16=dtype == torch.bfloat16)
        metrics.gpu_memory_total.set(torch.cuda.get_device_properties(runtime.device).total_memory)

    def run_eval() -> dict[str, float]:
        result = evaluate(model, eval_batches, classify, len(labels or []), runtime, dtype)
        history.append({"step": step, **result})
        metrics.eval_loss.set(result["loss"])
        for name, value in result.items():
            metrics.eval_metric(name, value)
        if runtime.is_main:
            log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def save_checkpoint(synchronous: bool = False) -> None:
        if not runtime.is_main:
            return
        trainer_state = {
            "scheduler": scheduler.state_dict(), "step": step, "micro_batch": micro_batch,
            "tokens_seen": tokens_seen, "eval_history": history,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None},
        }
        files: dict[str, Any] = {"model.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict(),
                                 "state.pt": trainer_state}
        if isinstance(job, PretrainJob):
            files["tokenizer.json"] = tokenizer.backend_tokenizer.to_str().encode()
        metrics.checkpoint_blocked.observe(checkpointer.save(step, files, synchronous=synchronous))

    if step == 0:
        run_eval()  # the starting point that later evaluations are judged against
    if runtime.is_main:
        log.info("training %s/%s %s: steps %d..%d on %s x%d", job.namespace, job.name, job.kind, step,
                 total_steps, runtime.device.type, runtime.world_size)

    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its shard-writing bars would interleave with ours

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and runtime.is_main),
               desc=job.name, unit="step", dynamic_ncols=True)
    window_loss = torch.zeros((), device=runtime.device)
    window_steps = window_tokens = window_computed = window_samples = 0
    window_start = time.perf_counter()
    train_loss: float | None = None
    model.train()
    while step < total_steps:
        for k in range(accumulation):
            fetch_started = time.perf_counter()
            micro = batches[micro_batch]
            batch = {name: t.to(runtime.device, non_blocking=True) for name, t in micro.inputs.items()}
            metrics.data_wait.inc(time.perf_counter() - fetch_started)
            micro_batch += 1
            last = k == accumulation - 1
            sync = wrapped.no_sync() if runtime.distributed and not last else nullcontext()  # type: ignore[operator]
            with sync, torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None):
                loss = wrapped(**batch).loss / accumulation
                loss.backward()
            window_loss += loss.detach()
            window_tokens += micro.real_tokens  # counted on the host before the forward: no device sync
            window_computed += micro.computed_tokens
            metrics.tokens.inc(micro.real_tokens)
            metrics.computed_tokens.inc(micro.computed_tokens)
            window_samples += len(batch["input_ids"])
        if training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        metrics.step.set(step)
        metrics.last_step_time.set(time.time())
        bar.update(1)

        if step % training.log_interval == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            mean_loss = train_loss = float(window_loss) / window_steps
            if not math.isfinite(mean_loss):
                log.error("loss is %s at step %d", mean_loss, step)
            tokens_seen += window_tokens
            metrics.loss.set(mean_loss)
            metrics.learning_rate.set(float(scheduler.get_last_lr()[0]))
            tokens_per_second = window_tokens / elapsed
            metrics.tokens_per_second.set(tokens_per_second)
            metrics.samples_per_second.set(window_samples / elapsed)
            if peak:
                metrics.mfu.set(model_flops_utilization(tokens_per_second, flops_per_token, peak))
            if runtime.device.type == "cuda":
                metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated(runtime.device))
                metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved(runtime.device))
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if runtime.is_main and not progress:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s, computed %.2fx the real tokens", step,
                         total_steps, mean_loss, scheduler.get_last_lr()[0], tokens_per_second,
                         window_computed / max(window_tokens, 1))
            window_loss.zero_()
            window_steps = window_tokens = window_computed = window_samples = 0
            window_start = time.perf_counter()
        if step % training.eval_interval == 0 or step == total_steps:
            run_eval()
        # Every rank asks, every step: all stop at the same step, and the last step always finishes the job.
        stopping = step < total_steps and stop.agreed(runtime)
        if step % spec.checkpoint.interval_steps == 0 or step == total_steps or stopping:
            save_checkpoint(synchronous=stopping)
        if stopping:
            if runtime.is_main and checkpointer.last_error is not None:
                raise StorageError(f"stopped on SIGTERM at step {step}, but its checkpoint could not be "
                                   f"written: {checkpointer.last_error}")
            checkpointer.close()
            raise Preempted(f"stopped on SIGTERM at step {step} of {total_steps}, its checkpoint committed")
    bar.close()

    # A run resumed from its final checkpoint trains no step: it still evaluates what it exports.
    final = history[-1] if history and history[-1]["step"] == step else run_eval()
    checkpointer.close()
    if runtime.is_main and checkpointer.last_error is not None:
        # The export below must never stand for a model whose last checkpoint did not commit.
        raise StorageError(f"the final checkpoint could not be written: {checkpointer.last_error}")

    export = export_uri(checkpoint_root)
    result: dict[str, Any] = {
        "job": job.name, "namespace": job.namespace, "kind": job.kind, "step": step,
        "totalSteps": total_steps, "resumedFromStep": resumed_from, "tokensSeen": tokens_seen,
        "trainLoss": train_loss,
        "finalEval": {k: v for k, v in final.items() if k != "step"}, "evalHistory": history,
        "device": runtime.device.type, "workers": runtime.world_size,
        "checkpointUri": checkpoint_root, "exportUri": export,
    }
    if labels is not None:
        result["labels"] = labels
    if runtime.is_main:
        started = time.perf_counter()
        if use_cache is not None:
            model.config.use_cache = use_cache  # the exported model generates with its cache
        export_model(storage, unwrap_for_export(model), tokenizer,
                     yaml.safe_dump(job.to_manifest(), sort_keys=False), result, job.spec_hash())
        log.info("exported the model to %s in %.1fs", export, time.perf_counter() - started)
    return result
