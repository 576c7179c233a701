"""Checkpoints: snapshot in the loop, upload in the background, commit with a manifest written last.

Layout under a job's checkpoint URI:

    checkpoints/step-00000050/{model.pt, optimizer.pt, state.pt, tokenizer.json, manifest.json}
    checkpoints/step-00000050/{shards/{.metadata, __0_0.distcp, __1_0.distcp, ...}, state.pt, ..., manifest.json}
    export/{config.json, model.safetensors, tokenizer files, job.yaml, result.json, manifest.json}

A checkpoint exists only once its manifest (files, sizes, sha256, step, spec hash, the job that wrote
it, the model's shape) is written, and readers trust nothing else: a writer killed mid-upload leaves a
directory without a manifest, which is ignored.

The second layout is a sharded checkpoint (training.parallelism fsdp): model and optimizer saved by
torch.distributed.checkpoint (DCP), each rank writing and uploading its own shard files, rank 0
committing one manifest that lists every rank's files and marks it `sharded`. DCP loads it into any
number of ranks, resharding as it reads.

A checkpoint whose manifest is there but does not hold (unreadable, a file missing or of another
size, a sha256 that differs, a file that is not tensors) is quarantined when a resume meets it: a
`QUARANTINED` object next to its manifest says why, nothing is deleted, and no reader trusts it
again; resume falls back to the next older one. Retention counts and deletes only committed,
unquarantined checkpoints, and only the files their manifests list.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from kubeforge.spec import EXPORT_DIR, Job, JobError
from kubeforge.storage import NotFound, Storage, StorageError, download_tree, join

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
#: Next to the manifest of a checkpoint that failed verification: its presence means "never trust".
QUARANTINE = "QUARANTINED"
#: In a state to save, and in a loaded checkpoint's files: model and optimizer as DCP shards.
SHARDS = "shards"
#: The directories kubeforge writes under checkpoints/; nothing else there is ever touched.
STEP_DIRECTORY = re.compile(r"step-(\d{8,})")


class CorruptCheckpoint(StorageError):
    """A committed checkpoint whose files are not what its manifest says: never to be trusted."""


class CheckpointMismatch(JobError):
    """Checkpoints at the job's URI that this job must not resume (another job's, another model, a
    changed spec): permanent, retrying would meet them again."""


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


def upload_files(storage: Storage, prefix: str, files: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    """Upload files (objects for torch.save, bytes, or local Paths, uploaded as they are) under
    prefix, each written to scratch first unless it is a Path; their manifest entries."""
    entries: list[dict[str, Any]] = []
    for name, payload in files.items():
        path = payload if isinstance(payload, Path) else scratch / name
        if not isinstance(payload, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(payload, bytes):
                path.write_bytes(payload)
            else:
                torch.save(payload, path)
        entries.append({"name": name, "size": path.stat().st_size, "sha256": _sha256(path)})
        storage.put_file(join(prefix, name), path)
    return entries


def commit(storage: Storage, prefix: str, entries: list[dict[str, Any]], manifest: dict[str, Any]) -> int:
    """Write the manifest listing entries, the commit point; the bytes of files and manifest."""
    manifest = {**manifest, "files": entries, "createdAt": datetime.now(UTC).isoformat()}
    body = json.dumps(manifest, indent=2).encode()
    storage.put_bytes(join(prefix, MANIFEST), body)
    return sum(e["size"] for e in entries) + len(body)


def uncommit(storage: Storage, prefix: str) -> None:
    """A previous commit at this prefix (and a quarantine of it) stops counting before any of its
    files is overwritten."""
    storage.delete([join(prefix, MANIFEST), join(prefix, QUARANTINE)])


def write_committed(storage: Storage, prefix: str, files: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Write files (see upload_files) under prefix, then the manifest; the bytes written."""
    uncommit(storage, prefix)
    with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as scratch:
        return commit(storage, prefix, upload_files(storage, prefix, files, Path(scratch)), manifest)


def check_manifest(body: bytes, sizes: dict[str, int], prefix: str) -> tuple[dict[str, Any] | None, str]:
    """The manifest in body if every file it lists is in `sizes` (a listing) at its size, else
    (None, what is wrong)."""
    try:
        manifest = json.loads(body)
        listed = {entry["name"]: int(entry["size"]) for entry in manifest["files"]}
        for entry in manifest["files"]:
            str(entry["sha256"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None, "its manifest is not a kubeforge manifest"
    if not listed:
        return None, "its manifest lists no files"
    for name, size in listed.items():
        present = sizes.get(join(prefix, name))
        if present is None:
            return None, f"{name} is missing"
        if present != size:
            return None, f"{name} has {present} bytes, its manifest says {size}"
    return manifest, ""


def read_manifest(storage: Storage, prefix: str) -> dict[str, Any] | None:
    """The manifest under prefix if it is complete and every file it lists is there at its size.

    The manifest proves integrity (the files are the ones written together, whole), not
    authorship: it lives in the same prefix, so whoever can write there can write a matching one.
    That is why nothing read through it may run code (see `load_tensors`)."""
    try:
        body = storage.get_bytes(join(prefix, MANIFEST))
    except StorageError:
        return None
    return check_manifest(body, storage.sizes(prefix), prefix)[0]


def fetch_verified(storage: Storage, prefix: str, manifest: dict[str, Any], target: Path, field: str) -> None:
    """Download the files a manifest lists (nothing else under prefix) and check each against it."""
    names = [entry["name"] for entry in manifest["files"]]
    for entry, path in zip(manifest["files"], download_tree(storage, prefix, target, field=field, only=names),
                           strict=True):
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"{field}: {storage.uri}/{join(prefix, entry['name'])} does not match its "
                               "manifest: refusing to use it")


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


def model_shape(state_dict: dict[str, Any]) -> str:
    """A digest of a model's parameter names and shapes: what a checkpoint can be loaded into."""
    described = sorted(f"{name}:{tuple(t.shape)}" for name, t in state_dict.items() if isinstance(t, torch.Tensor))
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:16]


def load_checkpoint(storage: Storage, checkpoint: Committed, target: Path, field: str) -> dict[str, Any]:
    """The saved objects of a checkpoint by file name (bytes for non-torch files); CorruptCheckpoint
    when a file is not what its manifest says. `field` names the spec field the URI came from."""
    fetch_verified(storage, checkpoint.prefix, checkpoint.manifest, target, field=field)
    loaded: dict[str, Any] = {}
    for entry in checkpoint.manifest["files"]:
        path = target / entry["name"]
        if entry["name"].startswith(f"{SHARDS}/"):
            loaded[SHARDS] = target / SHARDS  # read by load_sharded, into the model as it is sharded now
            continue
        where = f"{field}: {storage.uri}/{join(checkpoint.prefix, entry['name'])}"
        loaded[entry["name"]] = load_tensors(path, where) if entry["name"].endswith(".pt") else path.read_bytes()
    return loaded


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


class _VerifiedReader(dcp.FileSystemReader):
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


class _TensorsOnlyPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, but its non-tensor values (the optimizer's hyperparameters) loaded as
    load_tensors loads files: DCP's own planner unpickles them with weights_only=False."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(load_tensors(value, f"checkpoint value {read_item.dest_index.fqn}"), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


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
        dcp.load(state, storage_reader=_VerifiedReader(directory), planner=_TensorsOnlyPlanner(),
                 no_dist=not dist.is_initialized())
    except CheckpointException as exc:
        raise CorruptCheckpoint(f"{directory}: the shards cannot be loaded: {_failures(exc)}") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@dataclass(frozen=True)
class Committed:
    step: int
    prefix: str
    manifest: dict[str, Any]


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
    manifest: dict[str, Any] | None
    problem: str


@dataclass(frozen=True)
class UploadReport:
    step: int
    seconds: float
    bytes_written: int


def job_identity(job: Job) -> dict[str, str]:
    """What a manifest records of the job that wrote it (the uid only in a cluster)."""
    identity = {"namespace": job.namespace, "kind": job.kind, "name": job.name}
    return {**identity, "uid": job.metadata.uid} if job.metadata.uid else identity


def _same_job(owner: dict[str, Any], job: dict[str, str]) -> bool:
    """One job: same namespace, kind and name, and the same uid where both know one (a job deleted
    and created again under its name is another job; a run outside a cluster knows no uid)."""
    if any(owner.get(key) != job.get(key) for key in ("namespace", "kind", "name")):
        return False
    return not (owner.get("uid") and job.get("uid") and owner["uid"] != job["uid"])


def _describe(job: dict[str, Any]) -> str:
    uid = f" (uid {job['uid']})" if job.get("uid") else ""
    return f"{job.get('kind')} {job.get('namespace')}/{job.get('name')}{uid}"


class Checkpointer:
    """Saves checkpoints without stalling training, keeps the last K, finds the newest to resume.

    At most one upload runs at a time; a save that finds the previous one still running waits for
    it, so memory holds at most one snapshot besides the live state.

    A sharded save is every rank's: each calls save with the same step, and the uploads run the
    collectives of `group` (one of their own: the training loop's collectives run meanwhile)."""

    def __init__(self, storage: Storage, *, keep: int, spec_hash: str, rank: int,
                 group: dist.ProcessGroup | None = None, job: dict[str, str] | None = None,
                 on_uploaded: Callable[[UploadReport], None] | None = None,
                 on_failed: Callable[[BaseException], None] | None = None,
                 background: bool = True):
        self.storage = storage
        self.keep = keep
        self.spec_hash = spec_hash
        self.rank = rank
        self.group = group
        #: Whose checkpoints these are: namespace, kind, name and (in a cluster) uid.
        self.job = job or {}
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
            if manifest is not None and manifest.get("step") != step:
                problem = f"its manifest is for step {manifest.get('step')}, not {step}"
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
            checkpoint = Committed(found.step, found.prefix, found.manifest or {})
            try:
                if found.manifest is None:
                    raise CorruptCheckpoint(found.problem)
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
            marker = {"reason": reason, "at": datetime.now(UTC).isoformat(), "by": self.job}
            self.storage.put_bytes(join(prefix, QUARANTINE), json.dumps(marker, indent=2).encode())

    def _check_owner(self, checkpoint: Committed) -> None:
        where = f"{self.storage.uri}/{checkpoint.prefix}"
        owner = checkpoint.manifest.get("job")
        if owner is not None and not _same_job(owner, self.job):
            raise CheckpointMismatch(
                f"spec.checkpoint.uri: {where} belongs to {_describe(owner)}, not to {_describe(self.job)}: "
                "refusing to resume another job's checkpoints. Give this job its own checkpoint.uri, or "
                "set spec.checkpoint.warmStartFrom to start from that job's weights on purpose")
        if checkpoint.manifest.get("specHash") != self.spec_hash:
            raise CheckpointMismatch(
                f"spec.checkpoint.uri: {where} was written with another spec of this job (spec hash "
                f"{checkpoint.manifest.get('specHash')}, now {self.spec_hash}): what a job trains cannot change "
                "once it has checkpoints. Use a new checkpoint.uri, with spec.checkpoint.warmStartFrom "
                "pointing at this one to start from its weights")

    def check_model(self, restored: Restored, state_dict: dict[str, Any]) -> None:
        """Refuse (permanently) a checkpoint written for a model of another shape than this one."""
        saved = restored.checkpoint.manifest.get("modelShape")
        if saved is not None and saved != model_shape(state_dict):
            field = "spec.checkpoint.warmStartFrom" if restored.warm_start else "spec.checkpoint.uri"
            raise CheckpointMismatch(
                f"{field}: {restored.uri}/{restored.checkpoint.prefix} holds a model "
                "of another shape (architecture, size or vocabulary) than this job's: it cannot be loaded")

    # -- writing ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], *, synchronous: bool = False) -> float:
        """Snapshot `state` and upload it: in the background by default, before returning when
        `synchronous` (a graceful stop: the commit must land before the process exits).

        Returns the seconds the caller was blocked."""
        started = time.perf_counter()
        self.wait()
        snapshot = to_cpu_copy(state)
        manifest: dict[str, Any] = {"step": step, "specHash": self.spec_hash, "rank": self.rank, "job": self.job}
        if SHARDS in snapshot:
            manifest.update(sharded=True, worldSize=dist.get_world_size(self.group) if self.group else 1,
                            modelShape=model_shape(snapshot[SHARDS]["model"]))
        elif "model.pt" in snapshot:
            manifest["modelShape"] = model_shape(snapshot["model.pt"])
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
        entries: list[dict[str, Any]] = []
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
        listed = sorted((entry for rank_entries, _ in gathered for entry in rank_entries), key=lambda e: e["name"])
        return self._committed(step, started, commit(self.storage, prefix, listed, manifest))

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
            self.storage.delete([join(c.prefix, entry["name"]) for c in doomed for entry in c.manifest["files"]])

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
