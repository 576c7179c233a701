"""Checkpoints as commits: snapshot in the loop, upload in the background, commit with a manifest
written last; find the newest that verifies, quarantine the broken, retain the newest K.

It saves and returns files by name and never learns what they hold (state.py owns that), with one
exception, the protocol's own: an entry `shards` is a DCP save, which every rank writes and uploads
its part of and rank 0 commits for all (see sharded.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kubeforge.spec import Job, JobError
from kubeforge.storage import NotFound, Storage, StorageError, join
from kubeforge.trainer.checkpoint.manifest import (
    MANIFEST,
    QUARANTINE,
    CorruptCheckpoint,
    FileEntry,
    JobIdentity,
    Manifest,
    check_manifest,
    commit,
    fetch_verified,
    uncommit,
    upload_files,
    write_committed,
)
from kubeforge.trainer.checkpoint.safe_load import load_tensors
from kubeforge.trainer.checkpoint.sharded import SHARDS, save_sharded

# The package's name, as before it was split: operators' log queries and alerts match it.
log = logging.getLogger("kubeforge.trainer.checkpoint")

CHECKPOINTS = "checkpoints"
#: The directories kubeforge writes under checkpoints/; nothing else there is ever touched.
STEP_DIRECTORY = re.compile(r"step-(\d{8,})")


class CheckpointMismatch(JobError):
    """Checkpoints at the job's URI that this job must not resume (another job's, another model, a
    changed spec): permanent, retrying would meet them again."""


def step_prefix(step: int) -> str:
    return join(CHECKPOINTS, f"step-{step:08d}")


def to_cpu_copy(value: Any, copies: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A deep copy of a state dict with every tensor copied to CPU memory.

    This is all the training loop waits for: the copy is what makes the later upload safe while
    the optimizer keeps changing the live tensors. Tensors that are views of one storage (tied
    input and output embeddings) stay one tensor, so it is copied and saved once."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        local = value.to_local() if isinstance(value, DTensor) else value  # a shard: its own rank's part
        key = (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), local.dtype,
               tuple(value.shape), local.stride())
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        return copies[key]
    if isinstance(value, dict):
        return {k: to_cpu_copy(v, copies) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu_copy(v, copies) for v in value)
    return value


def model_shape(state_dict: dict[str, Any]) -> str:
    """A digest of a model's parameter names and shapes: what a checkpoint can be loaded into."""
    described = sorted(f"{name}:{tuple(t.shape)}" for name, t in state_dict.items() if isinstance(t, torch.Tensor))
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:16]


def check_model(restored: Restored, shape: str) -> None:
    """Refuse (permanently) a checkpoint written for a model of another shape (see model_shape)."""
    saved = restored.checkpoint.manifest.model_shape
    if saved is not None and saved != shape:
        field = "spec.checkpoint.warmStartFrom" if restored.warm_start else "spec.checkpoint.uri"
        raise CheckpointMismatch(
            f"{field}: {restored.uri}/{restored.checkpoint.prefix} holds a model "
            "of another shape (architecture, size or vocabulary) than this job's: it cannot be loaded")


def load_checkpoint(storage: Storage, checkpoint: Committed, target: Path, field: str) -> dict[str, Any]:
    """The saved objects of a checkpoint by file name (bytes for non-torch files); CorruptCheckpoint
    when a file is not what its manifest says. `field` names the spec field the URI came from."""
    fetch_verified(storage, checkpoint.prefix, checkpoint.manifest, target, field=field)
    loaded: dict[str, Any] = {}
    for entry in checkpoint.manifest.files:
        path = target / entry.name
        if entry.name.startswith(f"{SHARDS}/"):
            loaded[SHARDS] = target / SHARDS  # read by load_sharded, into the model as it is sharded now
            continue
        where = f"{field}: {storage.uri}/{join(checkpoint.prefix, entry.name)}"
        loaded[entry.name] = load_tensors(path, where) if entry.name.endswith(".pt") else path.read_bytes()
    return loaded


@dataclass(frozen=True)
class Committed:
    step: int
    prefix: str
    manifest: Manifest


@dataclass(frozen=True)
class Restored:
    """A verified checkpoint's saved objects by file name (bytes for non-torch files)."""

    checkpoint: Committed
    files: dict[str, Any]
    #: The storage it was read from.
    uri: str
    #: From spec.checkpoint.warmStartFrom: its weights only, training starts at step 0.
    warm_start: bool = False


@dataclass(frozen=True)
class _Found:
    """A checkpoint directory with a manifest: committed, or what is wrong with it."""

    step: int
    prefix: str
    manifest: Manifest | None
    problem: str


@dataclass(frozen=True)
class UploadReport:
    step: int
    seconds: float
    bytes_written: int


def job_identity(job: Job) -> JobIdentity:
    """What a manifest records of the job that wrote it (the uid only in a cluster)."""
    return JobIdentity(namespace=job.namespace, kind=job.kind, name=job.name, uid=job.metadata.uid or None)


class Checkpointer:
    """Saves checkpoints without stalling training, keeps the last K, finds the newest to resume.

    At most one upload runs at a time; a save that finds the previous one still running waits for
    it, so memory holds at most one snapshot besides the live state.

    A sharded save is every rank's: each calls save with the same step, and the uploads run the
    collectives of `group` (one of their own: the training loop's collectives run meanwhile)."""

    def __init__(self, storage: Storage, *, keep: int, spec_hash: str, rank: int,
                 group: dist.ProcessGroup | None = None, job: JobIdentity | None = None,
                 on_uploaded: Callable[[UploadReport], None] | None = None,
                 on_failed: Callable[[BaseException], None] | None = None,
                 background: bool = True):
        self.storage = storage
        self.keep = keep
        self.spec_hash = spec_hash
        self.rank = rank
        self.group = group
        #: Whose checkpoints these are: namespace, kind, name and (in a cluster) uid.
        self.job = job
        self.on_uploaded = on_uploaded
        self.on_failed = on_failed
        self.background = background
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[UploadReport | None] | None = None
        self.last_error: BaseException | None = None

    # -- reading ---------------------------------------------------------------------------------

    def _scan(self, storage: Storage) -> list[_Found]:
        """Every kubeforge checkpoint directory with a manifest and not quarantined, oldest first.

        A failed listing or manifest read raises StorageError: a transient error must never make
        a checkpoint look absent (retention would then count or delete the wrong ones). A manifest
        that is gone since the listing (NotFound, not an error) was retired: no checkpoint."""
        sizes = storage.sizes(CHECKPOINTS)
        directories: dict[str, set[str]] = {}
        for key in sizes:
            parts = key.split("/")
            if len(parts) == 3 and STEP_DIRECTORY.fullmatch(parts[1]):
                directories.setdefault(parts[1], set()).add(parts[2])
        found = []
        for directory, names in sorted(directories.items()):
            prefix = join(CHECKPOINTS, directory)
            if QUARANTINE in names:
                log.info("ignoring %s/%s: quarantined", storage.uri, prefix)
                continue
            if MANIFEST not in names:
                log.info("ignoring %s/%s: no complete manifest", storage.uri, prefix)
                continue
            step = int(directory.removeprefix("step-"))
            try:
                body = storage.get_bytes(join(prefix, MANIFEST))
            except NotFound:  # retired since the listing (another process's retention deletes it first)
                log.info("ignoring %s/%s: its manifest was deleted after the listing", storage.uri, prefix)
                continue
            manifest, problem = check_manifest(body, sizes, prefix)
            if manifest is not None and manifest.step != step:
                problem = f"its manifest is for step {manifest.step}, not {step}"
                manifest = None
            found.append(_Found(step, prefix, manifest, problem))
        return found

    def committed(self) -> list[Committed]:
        """Complete checkpoints (manifest and listed sizes hold), oldest first."""
        return [Committed(f.step, f.prefix, f.manifest) for f in self._scan(self.storage) if f.manifest is not None]

    def latest(self) -> Committed | None:
        committed = self.committed()
        return committed[-1] if committed else None

    def load(self, checkpoint: Committed, target: Path) -> dict[str, Any]:
        return load_checkpoint(self.storage, checkpoint, target, "spec.checkpoint.uri")

    def resume(self, target: Path) -> Restored | None:
        """The newest of this job's checkpoints that verifies, loaded; None when there is none.

        Broken ones met on the way (newest first) are quarantined and skipped. Another job's
        checkpoints, or this job's written with another spec, raise CheckpointMismatch (permanent)."""
        for found in reversed(self._scan(self.storage)):
            if found.manifest is None:
                self.quarantine(found.prefix, found.problem)
                continue
            checkpoint = Committed(found.step, found.prefix, found.manifest)
            self._check_owner(checkpoint)
            try:
                return Restored(checkpoint, self.load(checkpoint, target / found.prefix), self.storage.uri)
            except CorruptCheckpoint as exc:
                self.quarantine(found.prefix, str(exc))
        return None

    def warm_start(self, source: Storage, target: Path) -> Restored:
        """The newest verified checkpoint under spec.checkpoint.warmStartFrom (any job's), to start
        from its weights. Broken ones are skipped, not marked: that storage is someone else's."""
        for found in reversed(self._scan(source)):
            try:
                if found.manifest is None:
                    raise CorruptCheckpoint(found.problem)
                checkpoint = Committed(found.step, found.prefix, found.manifest)
                files = load_checkpoint(source, checkpoint, target / found.prefix, "spec.checkpoint.warmStartFrom")
                return Restored(checkpoint, files, source.uri, warm_start=True)
            except CorruptCheckpoint as exc:
                log.warning("spec.checkpoint.warmStartFrom: skipping %s/%s: %s", source.uri, found.prefix, exc)
        raise CheckpointMismatch(f"spec.checkpoint.warmStartFrom: {source.uri} holds no verified checkpoint")

    def quarantine(self, prefix: str, reason: str) -> None:
        """Mark a checkpoint never to be trusted again, keeping its files for whoever investigates."""
        log.error("checkpoint %s/%s is corrupt (%s): quarantined, resuming from an older one",
                  self.storage.uri, prefix, reason)
        if self.rank == 0:  # every rank reaches the same verdict; one marker is enough
            marker = {"reason": reason, "at": datetime.now(UTC).isoformat(),
                      "by": self.job.model_dump(exclude_none=True) if self.job else {}}
            self.storage.put_bytes(join(prefix, QUARANTINE), json.dumps(marker, indent=2).encode())

    def _check_owner(self, checkpoint: Committed) -> None:
        where = f"{self.storage.uri}/{checkpoint.prefix}"
        owner = checkpoint.manifest.job
        if owner is not None and not (self.job and owner.same_job(self.job)):
            raise CheckpointMismatch(
                f"spec.checkpoint.uri: {where} belongs to {owner}, not to {self.job or 'this unnamed run'}: "
                "refusing to resume another job's checkpoints. Give this job its own checkpoint.uri, or "
                "set spec.checkpoint.warmStartFrom to start from that job's weights on purpose")
        if checkpoint.manifest.spec_hash != self.spec_hash:
            raise CheckpointMismatch(
                f"spec.checkpoint.uri: {where} was written with another spec of this job (spec hash "
                f"{checkpoint.manifest.spec_hash}, now {self.spec_hash}): what a job trains cannot change "
                "once it has checkpoints. Use a new checkpoint.uri, with spec.checkpoint.warmStartFrom "
                "pointing at this one to start from its weights")

    # -- writing ---------------------------------------------------------------------------------

    def save(self, step: int, files: dict[str, Any], *, model_shape: str | None = None,
             synchronous: bool = False) -> float:
        """Snapshot `files` (by name) and upload them: in the background by default, before returning
        when `synchronous` (a graceful stop: the commit must land before the process exits).
        `model_shape` (see model_shape) is what a resume can load the weights into.

        Returns the seconds the caller was blocked."""
        started = time.perf_counter()
        self.wait()
        snapshot = to_cpu_copy(files)
        sharded = SHARDS in snapshot
        world_size = (dist.get_world_size(self.group) if self.group else 1) if sharded else None
        manifest = {"step": step, "spec_hash": self.spec_hash, "rank": self.rank, "job": self.job,
                    "sharded": sharded, "world_size": world_size, "model_shape": model_shape}
        upload = self._upload_sharded if SHARDS in snapshot else self._upload
        self._pending = self._executor.submit(upload, step, snapshot, manifest)
        if synchronous or not self.background:
            self.wait()
        return time.perf_counter() - started

    def _upload(self, step: int, snapshot: dict[str, Any], manifest: dict[str, Any]) -> UploadReport:
        started = time.perf_counter()
        written = write_committed(self.storage, step_prefix(step), snapshot, manifest)
        return self._committed(step, started, written)

    def _upload_sharded(self, step: int, snapshot: dict[str, Any], manifest: dict[str, Any]) -> UploadReport | None:
        """Every rank DCP-saves its shards to local scratch and uploads them with their hashes;
        rank 0 gathers every rank's names and hashes and commits one manifest, last. A rank whose
        upload failed still joins the gather, so none waits forever, and nothing is committed."""
        started, prefix = time.perf_counter(), step_prefix(step)
        entries: list[FileEntry] = []
        failure = ""
        with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as scratch:
            try:
                if self.rank == 0:
                    uncommit(self.storage, prefix)
            except Exception as exc:  # every rank's failure must still reach the gather
                failure = str(exc)
            # Collective; it raises on every rank when one rank's write fails.
            shards = save_sharded(snapshot.pop(SHARDS), Path(scratch) / SHARDS, self.group)
            files: dict[str, Any] = {f"{SHARDS}/{path.name}": path for path in shards}
            if self.rank == 0:
                files.update(snapshot)  # state.pt, tokenizer.json: every rank's copy is the same
            try:
                entries = upload_files(self.storage, prefix, files, Path(scratch)) if not failure else []
            except Exception as exc:
                failure = str(exc)
        gathered: list[Any] = [None] * (dist.get_world_size(self.group) if self.group else 1)
        if self.group:
            dist.gather_object((entries, failure), gathered if self.rank == 0 else None, dst=0, group=self.group)
        else:
            gathered[0] = (entries, failure)
        if self.rank != 0:
            if failure:
                raise StorageError(f"sharded checkpoint step {step} not committed: {failure}")
            return None
        failures = [f"rank {rank}: {failed}" for rank, (_, failed) in enumerate(gathered) if failed]
        if failures:
            raise StorageError(f"sharded checkpoint step {step} not committed: {'; '.join(failures)}")
        listed = sorted((entry for rank_entries, _ in gathered for entry in rank_entries), key=lambda e: e.name)
        return self._committed(step, started, commit(self.storage, prefix, Manifest(**manifest, files=listed)))

    def _committed(self, step: int, started: float, written: int) -> UploadReport:
        report = UploadReport(step, time.perf_counter() - started, written)
        log.info("checkpoint step %d committed to %s/%s (%.1f MB in %.2fs)", step, self.storage.uri,
                 step_prefix(step), written / 1e6, report.seconds)
        try:
            self._retain()
        except StorageError as exc:  # the commit stands; the next one retries retention
            log.warning("checkpoint retention skipped, nothing deleted: %s", exc)
        if self.on_uploaded:
            self.on_uploaded(report)
        return report

    def _retain(self) -> None:
        """Delete all but the newest `keep` committed checkpoints: the files their manifests list,
        manifest first, so a checkpoint stops counting before any of its files goes.

        Nothing else is touched: a directory without a kubeforge manifest (a user's, or an upload
        killed midway, which the same step's next save overwrites), a quarantined checkpoint (kept
        for whoever investigates; it does not count towards `keep`), a file no manifest lists. A
        failed listing or read raises before anything is deleted."""
        doomed = self.committed()[:-self.keep]
        if doomed:
            self.storage.delete([join(c.prefix, MANIFEST) for c in doomed])
            self.storage.delete([join(c.prefix, entry.name) for c in doomed for entry in c.manifest.files])

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
