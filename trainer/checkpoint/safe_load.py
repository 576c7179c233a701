"""Loading what storage holds without running code: torch files as tensors only, DCP metadata
through a restricted unpickler, DCP's non-tensor values as torch files.

Storage is not trusted to hold only what kubeforge wrote (a manifest proves integrity, not
authorship), so every byte read back from a checkpoint goes through this module.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from kubeforge.trainer.checkpoint.manifest import CorruptCheckpoint


def load_tensors(path: Path | io.BytesIO, where: str) -> Any:
    """A torch-saved file, loaded with weights_only=True: tensors, numbers, strings and containers
    of them. Anything else (a pickle that would construct arbitrary objects, i.e. run code) is
    refused: storage is not trusted to hold only what kubeforge wrote."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False; only its line naming the object is relevant here.
        what = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "unsupported object")
        raise CorruptCheckpoint(f"{where}: holds more than tensors, refusing to load it ({what})") from None
    except (RuntimeError, EOFError, OSError) as exc:  # torch's errors for a truncated or garbled file
        raise CorruptCheckpoint(f"{where}: not a readable torch file ({exc})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: this reads the one DCP writes (its dataclasses, sizes, dtypes,
    layouts and paths) and refuses any other global, which could run code."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib")) else None
        if ((module, name) in self.ALLOWED or isinstance(found, torch.dtype)
                or (isinstance(found, type) and found.__module__ == "torch.distributed.checkpoint.metadata")):
            return found
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in checkpoint metadata")


class VerifiedReader(dcp.FileSystemReader):
    """DCP's reader of a downloaded, verified checkpoint, its metadata read without running code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(str(self.path)) / ".metadata"
        try:
            with path.open("rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
            raise CorruptCheckpoint(f"{path}: not DCP metadata, refusing to load it ({exc})") from None
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpoint(f"{path}: not DCP metadata")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, but its non-tensor values (the optimizer's hyperparameters) loaded as
    load_tensors loads files: DCP's own planner unpickles them with weights_only=False."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(load_tensors(value, f"checkpoint value {read_item.dest_index.fqn}"), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)
