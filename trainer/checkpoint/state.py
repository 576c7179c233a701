"""What a checkpoint holds: each piece of training state saves and loads its own part, and
`TrainingState` is the one registry of them. Changing what a checkpoint holds means editing this file.

The files of one checkpoint, by name:

    model.pt, optimizer.pt   Weights, whole: every ddp rank holds the same, rank 0 writes them (a
                             QLoRA job's model.pt: the trained parameters alone)
    shards/                  Weights, sharded (training.parallelism fsdp): every rank its part, by DCP
    state.pt                 every other component's state, under its name: scheduler, progress, rng,
                             and for method adalora its rank allocation (adalora)
    tokenizer.json           the tokenizer a PretrainJob trained, which the model's vocabulary is

Two things are read from a checkpoint before the trainer can build what restores into them:
`saved_tokenizer` (a PretrainJob's model is built from it) and `saved_micro_batches_per_step` (a
resume on another number of ranks keeps a step's batch).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from kubeforge.trainer.checkpoint.checkpointer import Restored, check_model, model_shape
from kubeforge.trainer.checkpoint.sharded import SHARDS, load_sharded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kubeforge.trainer.data import Batches

MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
STATE = "state.pt"
TOKENIZER = "tokenizer.json"


class Stateful(Protocol):
    """A piece of training state that a checkpoint holds (torch's optimizers and schedulers are)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def trained_weights(model: torch.nn.Module) -> dict[str, Any]:
    """The model's state_dict entries of the parameters that train (a QLoRA model's adapters and head)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trained}


class Weights:
    """The model and its optimizer: whole (model.pt, optimizer.pt) or, sharded, as DCP shards by
    parameter name, which load into any number of ranks. Loads refuse weights of another shape.

    `trainable_only` (a QLoRA job's): model.pt holds only the parameters that train. The frozen base
    is quantized afresh from the base model at every start, the same every time, and bitsandbytes'
    quantized weights do not load back on CPU."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool,
                 trainable_only: bool = False):
        self.model, self.optimizer, self.sharded = model, optimizer, sharded
        self.trainable_only = trainable_only
        #: What its checkpoints can be loaded into: names and shapes, which training never changes.
        self.shape = model_shape(self._model_state())

    def _model_state(self) -> dict[str, Any]:
        return trained_weights(self.model) if self.trainable_only else self.model.state_dict()

    def files(self) -> dict[str, Any]:
        if self.sharded:
            model, optimizer = get_state_dict(self.model, self.optimizer)
            return {SHARDS: {"model": model, "optimizer": optimizer}}
        return {MODEL: self._model_state(), OPTIMIZER: self.optimizer.state_dict()}

    def load_model(self, restored: Restored) -> None:
        """The weights alone (a warm start), into the model as it is sharded now (or not)."""
        check_model(restored, self.shape)
        if SHARDS in restored.files:
            load_sharded(restored.files[SHARDS], self.model)
        else:
            set_model_state_dict(self.model, restored.files[MODEL],
                                 options=StateDictOptions(full_state_dict=True, strict=not self.trainable_only))

    def load(self, restored: Restored) -> None:
        """Weights and optimizer state, whichever way they were saved and the model is sharded now."""
        check_model(restored, self.shape)
        files = restored.files
        if SHARDS in files:
            load_sharded(files[SHARDS], self.model, self.optimizer)
        elif isinstance(self.model, FSDPModule):  # a ddp run's whole checkpoint, into this run's shards
            set_state_dict(self.model, self.optimizer, model_state_dict=files[MODEL],
                           optim_state_dict=self._by_name(files[OPTIMIZER]),
                           options=StateDictOptions(full_state_dict=True))
        else:
            # The shape check has matched the names: what a trainable-only load leaves is the frozen base.
            self.model.load_state_dict(files[MODEL], strict=not self.trainable_only)
            self.optimizer.load_state_dict(files[OPTIMIZER])

    def _by_name(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A whole optimizer state (parameters by index in its groups) keyed by parameter name, as
        set_state_dict takes it."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        by_index = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        return {
            "state": {by_index[i]: state for i, state in saved["state"].items()},
            "param_groups": [{**group, "params": [by_index[i] for i in group["params"]]}
                             for group in saved["param_groups"]],
        }


@dataclass
class TrainState:
    """Where a run stands."""

    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # the data position: the global index of the next micro-batch (data.Batches)
    tokens_seen: int = 0  # training tokens up to the last logged step
    eval_history: list[dict[str, Any]] = field(default_factory=list)


class Progress:
    """The run's TrainState, and the world it was trained in: resumed on another number of ranks,
    the data position is translated to where the same rows of the same epoch have been trained."""

    def __init__(self, state: TrainState, batches: Batches, world_size: int, accumulation: int):
        self.state, self.batches = state, batches
        self.world_size, self.accumulation = world_size, accumulation

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self.state), "world_size": self.world_size,
                "micro_batches_per_step": self.world_size * self.accumulation}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name in (f.name for f in fields(TrainState)):
            setattr(self.state, name, saved[name])
        self.state.micro_batch = self.batches.continue_from(self.state.micro_batch,
                                                            saved.get("world_size", self.world_size))


class Rng:
    """The random generators a run draws from (dropout, data order): resumed, they go on as they would have."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        torch.set_rng_state(saved["torch"])
        random.setstate(saved["python"])
        if self.device.type == "cuda" and saved["cuda"] is not None:
            torch.cuda.set_rng_state(saved["cuda"], self.device)


class AdaLoraAllocation:
    """AdaLoRA's rank allocation (method adalora): its allocator's smoothed importance of every
    adapter weight (peft's RankAllocator: ipt, exp_avg_ipt, exp_avg_unc) and the rank pattern it has
    allocated. The masked singular values themselves are weights; resumed, the budget goes on being
    moved by the same scores as it would have been."""

    SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model: Any):
        #: peft's AdaLoraModel under the PeftModel: it holds the allocator and the adapter's config.
        self.adalora = model.base_model

    @property
    def _config(self) -> Any:
        return self.adalora.peft_config[self.adalora.trainable_adapter_name]

    def allocate(self, step: int) -> None:
        """Once per optimizer step, after it and before its gradients are zeroed: score every
        singular value and mask those beyond the budget of this step."""
        self.adalora.update_and_allocate(step)

    def state_dict(self) -> dict[str, Any]:
        allocator = self.adalora.rankallocator
        return {**{name: dict(getattr(allocator, name)) for name in self.SCORES},
                "rank_pattern": self._config.rank_pattern}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        allocator = self.adalora.rankallocator
        device = next(self.adalora.parameters()).device
        for name in self.SCORES:
            setattr(allocator, name, {key: score.to(device) for key, score in saved[name].items()})
        self._config.rank_pattern = saved["rank_pattern"]


class TrainingState:
    """The registry: every piece of state a checkpoint holds, saved and restored together."""

    def __init__(self, weights: Weights, states: dict[str, Stateful], tokenizer: PreTrainedTokenizerBase | None):
        #: `tokenizer`: saved when the job trained it (a PretrainJob); a finetune's is its base model's.
        self.weights, self.states, self.tokenizer = weights, states, tokenizer

    def files(self) -> dict[str, Any]:
        """What a checkpoint holds, by file name."""
        files = self.weights.files()
        files[STATE] = {name: state.state_dict() for name, state in self.states.items()}
        if self.tokenizer is not None:
            files[TOKENIZER] = self.tokenizer.backend_tokenizer.to_str().encode()
        return files

    def restore(self, restored: Restored) -> None:
        """Everything files() saved; from a warm start, the weights alone (training starts at step 0)."""
        if restored.warm_start:
            self.weights.load_model(restored)
            return
        self.weights.load(restored)
        saved = _state(restored)
        for name, state in self.states.items():
            state.load_state_dict(saved[name])


def saved_tokenizer(restored: Restored | None) -> str | None:
    """The tokenizer a PretrainJob's checkpoint saved (its model's vocabulary), as JSON."""
    saved = restored.files.get(TOKENIZER) if restored is not None else None
    return saved.decode() if saved is not None else None


def saved_micro_batches_per_step(restored: Restored | None) -> int | None:
    """Micro-batches per optimizer step across all ranks of the run that saved the checkpoint."""
    if restored is None or restored.warm_start:
        return None
    saved = _state(restored)["progress"].get("micro_batches_per_step")
    return int(saved) if saved is not None else None


def _state(restored: Restored) -> dict[str, Any]:
    """state.pt by component name; a checkpoint of an earlier kubeforge kept progress at its top level."""
    saved: dict[str, Any] = restored.files[STATE]
    return saved if "progress" in saved else {"progress": saved, **saved}
