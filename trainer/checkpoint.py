"""Checkpoints: snapshot in the loop, upload in the background, commit with a manifest written last.

Layout under a job's checkpoint URI:

    checkpoints/step-00000050/{model.pt, optimizer.pt, state.pt, tokenizer.json, manifest.json}
    export/{config.json, model.safetensors, tokenizer files, job.yaml, result.json, manifest.json}

A checkpoint exists only once its manifest (files, sizes, sha256, step, spec hash) is written, and
readers trust nothing else: a writer killed mid-upload leaves a directory that is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kubeforge.spec import EXPORT_DIR
from kubeforge.storage import Storage, StorageError, download_tree, join

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def step_prefix(step: int) -> str:
    return join(CHECKPOINTS, f"step-{step:08d}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_cpu_copy(value: Any, copies: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A deep copy of a state dict with every tensor copied to CPU memory.

    This is all the training loop waits for: the copy is what makes the later upload safe while
    the optimizer keeps changing the live tensors. Tensors that are views of one storage (tied
    input and output embeddings) stay one tensor, so it is copied and saved once."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype,
               tuple(value.shape), value.stride())
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        return copies[key]
    if isinstance(value, dict):
        return {k: to_cpu_copy(v, copies) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu_copy(v, copies) for v in value)
    return value


def write_committed(storage: Storage, prefix: str, files: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Write files (objects for torch.save, bytes, or local Paths) under prefix, then the manifest.

    Returns the bytes written."""
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as scratch:
        for name, payload in files.items():
            path = Path(scratch) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(payload, Path):
                shutil.copyfile(payload, path)
            elif isinstance(payload, bytes):
                path.write_bytes(payload)
            else:
                torch.save(payload, path)
            entries.append({"name": name, "size": path.stat().st_size, "sha256": _sha256(path)})
            storage.put_file(join(prefix, name), path)
    manifest = {**manifest, "files": entries, "createdAt": datetime.now(UTC).isoformat()}
    body = json.dumps(manifest, indent=2).encode()
    storage.put_bytes(join(prefix, MANIFEST), body)  # the commit point
    return sum(e["size"] for e in entries) + len(body)


def read_manifest(storage: Storage, prefix: str) -> dict[str, Any] | None:
    """The manifest under prefix if it is complete and every file it lists is there at its size.

    The manifest proves integrity (the files are the ones written together, whole), not
    authorship: it lives in the same prefix, so whoever can write there can write a matching one.
    That is why nothing read through it may run code (see `load_tensors`)."""
    try:
        manifest = json.loads(storage.get_bytes(join(prefix, MANIFEST)))
        listed = {entry["name"]: int(entry["size"]) for entry in manifest.get("files", [])}
    except (StorageError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None
    present = storage.sizes(prefix)
    if not listed or any(present.get(join(prefix, name)) != size for name, size in listed.items()):
        return None
    return manifest


def fetch_verified(storage: Storage, prefix: str, manifest: dict[str, Any], target: Path, field: str) -> None:
    """Download the files a manifest lists (nothing else under prefix) and check each against it."""
    names = [entry["name"] for entry in manifest["files"]]
    for entry, path in zip(manifest["files"], download_tree(storage, prefix, target, field=field, only=names),
                           strict=True):
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise StorageError(f"{field}: {storage.uri}/{join(prefix, entry['name'])} does not match its "
                               "manifest: refusing to use it")


def load_tensors(path: Path, where: str) -> Any:
    """A torch-saved file, loaded with weights_only=True: tensors, numbers, strings and containers
    of them. Anything else (a pickle that would construct arbitrary objects, i.e. run code) is
    refused: storage is not trusted to hold only what kubeforge wrote."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False; only its line naming the object is relevant here.
        what = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "unsupported object")
        raise StorageError(f"{where}: holds more than tensors, refusing to load it ({what})") from None


@dataclass(frozen=True)
class Committed:
    step: int
    prefix: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class UploadReport:
    step: int
    seconds: float
    bytes_written: int


class Checkpointer:
    """Saves checkpoints without stalling training, keeps the last K, finds the newest to resume.

    At most one upload runs at a time; a save that finds the previous one still running waits for
    it, so memory holds at most one snapshot besides the live state."""

    def __init__(self, storage: Storage, *, keep: int, spec_hash: str, rank: int,
                 on_uploaded: Callable[[UploadReport], None] | None = None,
                 on_failed: Callable[[BaseException], None] | None = None,
                 background: bool = True):
        self.storage = storage
        self.keep = keep
        self.spec_hash = spec_hash
        self.rank = rank
        self.on_uploaded = on_uploaded
        self.on_failed = on_failed
        self.background = background
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[UploadReport] | None = None
        self.last_error: BaseException | None = None

    # -- reading ---------------------------------------------------------------------------------

    def committed(self) -> list[Committed]:
        """Complete checkpoints, oldest first."""
        steps = sorted({key.split("/")[1] for key in self.storage.list(CHECKPOINTS)
                        if key.count("/") >= 2 and key.split("/")[1].startswith("step-")})
        found = []
        for directory in steps:
            prefix = join(CHECKPOINTS, directory)
            manifest = read_manifest(self.storage, prefix)
            if manifest is not None:
                found.append(Committed(int(manifest["step"]), prefix, manifest))
            else:
                log.info("ignoring %s/%s: no complete manifest", self.storage.uri, prefix)
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Committed | None:
        committed = self.committed()
        return committed[-1] if committed else None

    def load(self, checkpoint: Committed, target: Path) -> dict[str, Any]:
        """The saved objects of a checkpoint by file name (bytes for non-torch files)."""
        if checkpoint.manifest.get("specHash") != self.spec_hash:
            log.warning("checkpoint %s was written by a different spec (hash %s, now %s); resuming anyway",
                        checkpoint.prefix, checkpoint.manifest.get("specHash"), self.spec_hash)
        fetch_verified(self.storage, checkpoint.prefix, checkpoint.manifest, target, field="checkpoint.uri")
        loaded: dict[str, Any] = {}
        for entry in checkpoint.manifest["files"]:
            path = target / entry["name"]
            where = f"checkpoint.uri: {self.storage.uri}/{join(checkpoint.prefix, entry['name'])}"
            loaded[entry["name"]] = load_tensors(path, where) if entry["name"].endswith(".pt") else path.read_bytes()
        return loaded

    # -- writing ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> float:
        """Snapshot `state` and upload it (in the background by default).

        Returns the seconds the caller was blocked."""
        started = time.perf_counter()
        self.wait()
        snapshot = to_cpu_copy(state)
        manifest = {"step": step, "specHash": self.spec_hash, "rank": self.rank}
        if self.background:
            self._pending = self._executor.submit(self._upload, step, snapshot, manifest)
        else:
            self._upload(step, snapshot, manifest)
        return time.perf_counter() - started

    def _upload(self, step: int, snapshot: dict[str, Any], manifest: dict[str, Any]) -> UploadReport:
        started = time.perf_counter()
        written = write_committed(self.storage, step_prefix(step), snapshot, manifest)
        report = UploadReport(step, time.perf_counter() - started, written)
        log.info("checkpoint step %d committed to %s/%s (%.1f MB in %.2fs)", step, self.storage.uri,
                 step_prefix(step), written / 1e6, report.seconds)
        self._retain()
        if self.on_uploaded:
            self.on_uploaded(report)
        return report

    def _retain(self) -> None:
        """Delete all but the newest `keep` complete checkpoints, and leftovers older than them.

        Runs only after a new manifest is written, so the newest complete checkpoint survives."""
        committed = self.committed()
        if not committed:
            return
        kept = {c.prefix for c in committed[-self.keep:]}
        newest = committed[-1].step
        doomed = []
        for key in self.storage.list(CHECKPOINTS):
            directory = "/".join(key.split("/")[:2])
            step_text = directory.rsplit("-", 1)[-1]
            if directory in kept or not step_text.isdigit():
                continue
            # An incomplete directory newer than the newest commit may be an upload in flight.
            if int(step_text) < newest or directory in {c.prefix for c in committed}:
                doomed.append(key)
        if doomed:
            self.storage.delete(doomed)

    def uploads_pending(self) -> int:
        """Snapshots whose upload is still running (0 or 1: a save waits for the previous upload)."""
        pending = self._pending
        return int(pending is not None and not pending.done())

    def wait(self) -> None:
        """Block until the pending upload is done; an upload failure is logged, not raised, so the
        loop keeps training and the next checkpoint tries again."""
        if self._pending is None:
            return
        try:
            self._pending.result()
            self.last_error = None  # a later commit supersedes an earlier failure
        except Exception as exc:
            self.last_error = exc
            log.error("checkpoint upload failed: %s", exc)
            if self.on_failed:
                self.on_failed(exc)
        self._pending = None

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)


def export_model(storage: Storage, model: Any, tokenizer: Any, job_yaml: str, result: dict[str, Any],
                 spec_hash: str) -> int:
    """Save the final model in Hugging Face format (+ tokenizer, the job and its result) under
    export/, committed by its manifest like a checkpoint."""
    # A previous export stops counting before any of its files is overwritten.
    storage.delete([join(EXPORT_DIR, MANIFEST)])
    with tempfile.TemporaryDirectory(prefix="kubeforge-export-") as scratch:
        root = Path(scratch)
        model.save_pretrained(root)
        tokenizer.save_pretrained(root)
        (root / "job.yaml").write_text(job_yaml)
        (root / "result.json").write_text(json.dumps(result, indent=2))
        files: dict[str, Any] = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        return write_committed(storage, EXPORT_DIR, files, {"step": result["step"], "specHash": spec_hash})
