"""torchrun's environment: which process this is, on which device, with which precision."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

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
