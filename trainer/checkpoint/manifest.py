"""The commit protocol: a set of files under a prefix counts once its manifest (`manifest.json`,
written last) lists them with their sizes and sha256, and readers trust nothing else.

The manifest proves integrity (the files are the ones written together, whole), not authorship: it
lives in the same prefix, so whoever can write there can write a matching one. That is why nothing
read through it may run code (see safe_load). Checkpoints, exports and the base models fetched from
them all commit and verify through this module; no other module parses a manifest.
"""

from __future__ import annotations

import hashlib
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kubeforge.storage import Storage, StorageError, download_tree, join

MANIFEST = "manifest.json"
#: Next to the manifest of a checkpoint that failed verification: its presence means "never trust".
QUARANTINE = "QUARANTINED"


class CorruptCheckpoint(StorageError):
    """A committed checkpoint whose files are not what its manifest says: never to be trusted."""


class _Wire(BaseModel):
    # camelCase in storage, as the job's spec and status are; keys a newer writer adds are ignored.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class FileEntry(_Wire):
    """One committed file, by its name relative to the manifest's prefix."""

    name: str
    size: int = Field(ge=0)
    sha256: str


class JobIdentity(_Wire):
    """The job that wrote a checkpoint: namespace, kind, name and, in a cluster, its uid."""

    namespace: str
    kind: str
    name: str
    uid: str | None = None

    def same_job(self, other: JobIdentity) -> bool:
        """One job: same namespace, kind and name, and the same uid where both know one (a job deleted
        and created again under its name is another job; a run outside a cluster knows no uid)."""
        if (self.namespace, self.kind, self.name) != (other.namespace, other.kind, other.name):
            return False
        return not (self.uid and other.uid and self.uid != other.uid)

    def __str__(self) -> str:
        uid = f" (uid {self.uid})" if self.uid else ""
        return f"{self.kind} {self.namespace}/{self.name}{uid}"


class Manifest(_Wire):
    """What a commit holds: its files, and for a checkpoint who wrote it and what it can resume."""

    step: int
    files: list[FileEntry] = Field(min_length=1)
    spec_hash: str | None = None
    #: The rank that committed it (rank 0 for a sharded checkpoint, which lists every rank's files).
    rank: int | None = None
    job: JobIdentity | None = None
    #: Model and optimizer as DCP shards (training.parallelism fsdp), written by `world_size` ranks.
    sharded: bool = False
    world_size: int | None = None
    #: What the weights can be loaded into (see checkpointer.model_shape).
    model_shape: str | None = None
    created_at: str | None = None

    @field_validator("job", mode="before")
    @classmethod
    def _unnamed_job(cls, value: Any) -> Any:
        return value or None  # a run that named no job recorded {}

    def dumps(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2).encode()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload_files(storage: Storage, prefix: str, files: dict[str, Any], scratch: Path) -> list[FileEntry]:
    """Upload files (objects for torch.save, bytes, or local Paths, uploaded as they are) under
    prefix, each written to scratch first unless it is a Path; their manifest entries."""
    entries: list[FileEntry] = []
    for name, payload in files.items():
        path = payload if isinstance(payload, Path) else scratch / name
        if not isinstance(payload, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(payload, bytes):
                path.write_bytes(payload)
            else:
                torch.save(payload, path)
        entries.append(FileEntry(name=name, size=path.stat().st_size, sha256=sha256(path)))
        storage.put_file(join(prefix, name), path)
    return entries


def commit(storage: Storage, prefix: str, manifest: Manifest) -> int:
    """Write the manifest, the commit point; the bytes of its files and itself."""
    body = manifest.model_copy(update={"created_at": datetime.now(UTC).isoformat()}).dumps()
    storage.put_bytes(join(prefix, MANIFEST), body)
    return sum(entry.size for entry in manifest.files) + len(body)


def uncommit(storage: Storage, prefix: str) -> None:
    """A previous commit at this prefix (and a quarantine of it) stops counting before any of its
    files is overwritten."""
    storage.delete([join(prefix, MANIFEST), join(prefix, QUARANTINE)])


def write_committed(storage: Storage, prefix: str, files: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Write files (see upload_files) under prefix, then the manifest (its other fields given by
    `manifest`); the bytes written."""
    uncommit(storage, prefix)
    with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as scratch:
        entries = upload_files(storage, prefix, files, Path(scratch))
        return commit(storage, prefix, Manifest.model_validate({**manifest, "files": entries}))


def check_manifest(body: bytes, sizes: dict[str, int], prefix: str) -> tuple[Manifest | None, str]:
    """The manifest in body if every file it lists is in `sizes` (a listing) at its size, else
    (None, what is wrong)."""
    try:
        manifest = Manifest.model_validate_json(body)
    except ValidationError as exc:
        lists_no_files = any(error["loc"] == ("files",) and error["type"] == "too_short" for error in exc.errors())
        return None, "its manifest lists no files" if lists_no_files else "its manifest is not a kubeforge manifest"
    for entry in manifest.files:
        present = sizes.get(join(prefix, entry.name))
        if present is None:
            return None, f"{entry.name} is missing"
        if present != entry.size:
            return None, f"{entry.name} has {present} bytes, its manifest says {entry.size}"
    return manifest, ""


def read_manifest(storage: Storage, prefix: str) -> Manifest | None:
    """The manifest under prefix if it is complete and every file it lists is there at its size."""
    try:
        body = storage.get_bytes(join(prefix, MANIFEST))
    except StorageError:
        return None
    return check_manifest(body, storage.sizes(prefix), prefix)[0]


def fetch_verified(storage: Storage, prefix: str, manifest: Manifest, target: Path, field: str) -> None:
    """Download the files a manifest lists (nothing else under prefix) and check each against it."""
    names = [entry.name for entry in manifest.files]
    for entry, path in zip(manifest.files, download_tree(storage, prefix, target, field=field, only=names),
                           strict=True):
        if path.stat().st_size != entry.size or sha256(path) != entry.sha256:
            raise CorruptCheckpoint(f"{field}: {storage.uri}/{join(prefix, entry.name)} does not match its "
                                    "manifest: refusing to use it")
