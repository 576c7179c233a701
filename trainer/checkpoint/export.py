"""The final model in Hugging Face format under export/, committed by its manifest like a checkpoint."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubeforge.spec import EXPORT_DIR
from kubeforge.status import TrainerResult
from kubeforge.storage import Storage, join
from kubeforge.trainer.checkpoint.manifest import MANIFEST, write_committed


def export_model(storage: Storage, save_model: Callable[[Path], Any], tokenizer: Any, job_yaml: str,
                 result: TrainerResult, spec_hash: str) -> int:
    """Save the final model in Hugging Face format (`save_model` into a directory) with its
    tokenizer, the job and its result under export/, committed by its manifest like a checkpoint.

    `save_model` runs before result.json is written: export.quantize's completes the result with
    what it measured (result.compression) and writes the quantized model beside the full one."""
    # A previous export stops counting before any of its files is overwritten.
    storage.delete([join(EXPORT_DIR, MANIFEST)])
    with tempfile.TemporaryDirectory(prefix="kubeforge-export-") as scratch:
        root = Path(scratch)
        save_model(root)
        tokenizer.save_pretrained(root)
        (root / "job.yaml").write_text(job_yaml)
        (root / "result.json").write_text(json.dumps(result.to_json(), indent=2))
        files: dict[str, Any] = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        return write_committed(storage, EXPORT_DIR, files, {"step": result.step, "spec_hash": spec_hash})
