"""torchrun's environment: which process this is, on which device, with which precision."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import FrameType, TracebackType

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from kubeforge.spec import JobError

log = logging.getLogger(__name__)


class NoGPUError(JobError):
    """A GPU was required and none can be had."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(gpus_wanted: int, allow_cpu_fallback: bool) -> Runtime:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun's), pick the device and join the process group.

    MASTER_ADDR and MASTER_PORT are read by torch itself (env:// rendezvous)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
        # TF32 tensor cores for the float32 matmuls: those of precision fp32 and those autocast keeps
        # in fp32. Its 10-bit mantissa is what the mixed-precision recipes train with; flops.py counts
        # MFU of fp32 runs against the TF32 peak accordingly.
        torch.set_float32_matmul_precision("high")
    else:
        if gpus_wanted and not allow_cpu_fallback:
            raise NoGPUError(
                f"resources.gpusPerWorker is {gpus_wanted} but no GPU is visible and "
                "resources.allowCpuFallback is false")
        device = torch.device("cpu")
        backend = "gloo"
        if rank == 0:
            log.info("no GPU found: training on CPU (gloo backend for distributed runs)")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is fp32 on CPU: without native bf16, CPU autocast runs about 30x slower."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise NoGPUError("training.precision is bf16 but this GPU does not support bf16")
        return None
    if precision == "bf16":
        log.warning("training.precision is bf16 on a CPU: expect it to be much slower than fp32")
        return torch.bfloat16
    return None


def shard(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """FSDP2, in place: each transformer block is a unit of its own (its parameters gathered just
    before it runs and freed after), the rest (embeddings, head) the root's. With bf16, parameters
    are gathered and computed in bf16 while gradients are reduced in fp32."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == torch.bfloat16 else MixedPrecisionPolicy())
    # transformers names its blocks on the model (under a LoRA wrapper, on the model it wraps).
    blocks = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap(model: torch.nn.Module, parallelism: str, runtime: Runtime, dtype: torch.dtype | None) -> torch.nn.Module:
    """The module the training step runs: the model itself alone, sharded in place under fsdp, else
    in DistributedDataParallel. The optimizer must be built after: sharding replaces the parameters."""
    if not runtime.distributed:
        return model
    if parallelism == "fsdp":
        shard(model, dtype)
        return model
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> AbstractContextManager[None]:
    """Around a micro-batch's backward: whether its gradients are reduced across ranks now (the last
    micro-batch of a step) or only accumulated locally."""
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
    elif isinstance(wrapped, DistributedDataParallel) and not enabled:
        return wrapped.no_sync()
    return nullcontext()


def checkpoint_group(runtime: Runtime) -> dist.ProcessGroup | None:
    """A process group for sharded checkpoints' collectives, which run in the upload thread while
    training's run in the main one: on one group their order could interleave differently on each
    rank. gloo: the snapshots they exchange are in CPU memory."""
    return dist.new_group(backend="gloo") if runtime.distributed else None


def all_reduce_max(value: int, runtime: Runtime) -> int:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()



class GracefulStop:
    """SIGTERM noted (suspend, pod deletion, drain, eviction, preemption), acted on at the next step
    boundary: the step finishes, a checkpoint commits, the process exits.

    Used as a context manager around training: the handler is installed on entry (in the main thread,
    the only one Python delivers signals to) and the previous one restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: signal.Handlers | int | None = None
        self._installed = False

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("%s received: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)  # type: ignore[assignment]
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any rank was asked to stop: every rank calls this after each step and gets the
        same answer, so all stop at the same step (one tiny all-reduce per step when distributed)."""
        if not runtime.distributed:
            return self.requested
        return all_reduce_sum([float(self.requested)], runtime)[0] > 0
