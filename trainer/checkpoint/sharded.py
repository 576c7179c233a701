"""Sharded model and optimizer state (training.parallelism fsdp) through torch.distributed.checkpoint
(DCP): every rank saves and loads its own part, and DCP reshards on load, so a checkpoint written by
N ranks loads into any number of them (or into a plain model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from kubeforge.storage import StorageError
from kubeforge.trainer.checkpoint.manifest import CorruptCheckpoint
from kubeforge.trainer.checkpoint.safe_load import TensorsOnlyPlanner, VerifiedReader

#: In a state to save, and in a loaded checkpoint's files: model and optimizer as DCP shards.
SHARDS = "shards"


def _failures(exc: CheckpointException) -> str:
    """What failed on which rank: DCP's exception carries each rank's exception and traceback."""
    return "; ".join(f"rank {rank}: {failure[0]}" for rank, failure in sorted(exc.failures.items()))


def save_sharded(state: dict[str, Any], directory: Path, group: dist.ProcessGroup | None) -> list[Path]:
    """DCP-save state (every rank its own part) into directory; the files this rank wrote. A write
    that fails on any rank raises StorageError on every rank."""
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), process_group=group, no_dist=group is None)
    except CheckpointException as exc:  # a BaseException: the upload thread's error handling would miss it
        raise StorageError(f"writing the shards failed: {_failures(exc)}") from None
    return sorted(directory.iterdir())


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint into the model (and optimizer) as they are sharded now, on any
    number of ranks, or none (a plain model): DCP reads each rank the parts it holds."""
    state: dict[str, Any]
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=VerifiedReader(directory), planner=TensorsOnlyPlanner(),
                 no_dist=not dist.is_initialized())
    except CheckpointException as exc:
        raise CorruptCheckpoint(f"{directory}: the shards cannot be loaded: {_failures(exc)}") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
