"""One small storage interface for data, checkpoints and exported models: S3 or a local directory.

Keys are '/'-separated paths relative to the storage's root URI. S3 works with any endpoint (AWS,
MinIO, Ceph, moto); credentials come from the standard AWS environment variables or config, never
from a job spec.
"""

from __future__ import annotations

import builtins
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kubeforge.spec import S3Spec


class StorageError(RuntimeError):
    pass


class NotFound(StorageError):
    """The key does not exist (S3 is strongly consistent: one just listed was deleted since)."""


class Storage(Protocol):
    uri: str

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every key under prefix (recursively) with its size in bytes."""
        ...
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Every key under prefix (recursively), sorted."""
        ...
    def versions(self, prefix: str = "") -> dict[str, str]:
        """Every key under prefix with what changes when its content does: its size and S3 ETag, or
        a local file's modification time."""
        ...
    def delete(self, keys: builtins.list[str]) -> None: ...


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LocalStorage:
    """A directory. Files are written to a temporary name and renamed, so a reader never sees half
    a file even when the writer is killed."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes {self.root}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(path, partial)
        os.replace(partial, target)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, target)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri}/{key}: not found") from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise NotFound(f"{self.uri}/{key}: not found") from None

    def _stats(self, prefix: str) -> dict[str, os.stat_result]:
        """Every file under prefix (recursively), stat'ed once."""
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return {prefix: base.stat()}
        if not base.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): p.stat()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".partial")
        }

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: stat.st_size for key, stat in self._stats(prefix).items()}

    def list(self, prefix: str = "") -> builtins.list[str]:
        return sorted(self.sizes(prefix))

    def versions(self, prefix: str = "") -> dict[str, str]:
        return {key: f"{stat.st_size}:{stat.st_mtime_ns}" for key, stat in self._stats(prefix).items()}

    def delete(self, keys: builtins.list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # Leave no empty checkpoint directories behind.
        for parent in sorted({self._path(k).parent for k in keys}, key=lambda p: -len(p.parts)):
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


class S3Storage:
    """An s3://bucket/prefix through boto3."""

    def __init__(self, uri: str, s3: S3Spec | None = None):
        import boto3  # the operator never needs it at import time

        parsed = urlparse(uri)
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        s3 = s3 or S3Spec()
        #: Sent with every write, so nothing kubeforge stores is left unencrypted at rest by mistake.
        self.encryption: dict[str, str] = {}
        if s3.server_side_encryption:
            self.encryption["ServerSideEncryption"] = s3.server_side_encryption
        if s3.kms_key_id:
            self.encryption["SSEKMSKeyId"] = s3.kms_key_id
        self.client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region_name=s3.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        # botocore's messages name the operation and the error code, never the credentials.
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")  # a botocore ClientError's
        error = NotFound if code in ("NoSuchKey", "404") else StorageError  # get_object's, head_object's
        return error(f"{what} s3://{self.bucket}/{self._key(key)}: {exc}")

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=self.encryption)
        except Exception as exc:
            raise self._fail("upload to", key, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **self.encryption)
        except Exception as exc:
            raise self._fail("write to", key, exc) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            raise self._fail("read from", key, exc) from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except Exception as exc:
            raise self._fail("download from", key, exc) from None

    def _objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        full = self._key(prefix)
        found: dict[str, dict[str, Any]] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                found.update((obj["Key"], obj) for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._fail("list", prefix, exc) from None
        strip = len(self.prefix) + 1 if self.prefix else 0
        # A prefix names a key or a "directory", not a stem: step-1 must not list step-10.
        return {
            k[strip:]: obj for k, obj in found.items()
            if not full or k == full or k.startswith(full.rstrip("/") + "/")
        }

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: obj["Size"] for key, obj in self._objects(prefix).items()}

    def versions(self, prefix: str = "") -> dict[str, str]:
        objects = self._objects(prefix)
        return {key: f"{obj['Size']}:{obj.get('ETag', '').strip(chr(34))}" for key, obj in objects.items()}

    def list(self, prefix: str = "") -> builtins.list[str]:
        return sorted(self.sizes(prefix))

    def delete(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise self._fail("delete from", keys[start], exc) from None


def open_storage(uri: str, s3: S3Spec | None = None) -> Storage:
    """The storage rooted at uri: s3://bucket/prefix, file:///dir or a plain path."""
    if uri.startswith("s3://"):
        if not urlparse(uri).netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        return S3Storage(uri, s3)
    if uri.startswith("file://"):
        return LocalStorage(urlparse(uri).path)
    if "://" in uri:
        raise StorageError(f"{uri}: only s3:// URIs and local paths are supported")
    return LocalStorage(uri)


def local_path(target: Path, relative: str, field: str) -> Path:
    """target/relative, refused unless it is a plain relative path that stays inside target.

    Object keys come from storage that someone else may write: a key with `..`, an absolute path, a
    backslash or a drive letter would otherwise write wherever it points (on `kubeforge run`, onto
    the user's own machine); resolving also refuses a path through a symlink that leads out."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or "\0" in relative
            or any(part in ("", ".", "..") for part in parts) or ":" in parts[0]):
        raise StorageError(f"{field}: object key {relative!r} is not a plain relative path: refusing to "
                           "write it outside the download directory")
    root = target.resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise StorageError(f"{field}: object key {relative!r} leads outside the download directory")
    return path


def download_tree(storage: Storage, prefix: str, target: Path, *, field: str,
                  only: Iterable[str] | None = None) -> list[Path]:
    """Copy the objects under prefix into target, keeping relative paths: every one, or only the
    relative names in `only` (a manifest's files). `field` names the spec field the URI came from,
    for the error when a key would land outside target."""
    if only is None:
        names = [key[len(prefix):].lstrip("/") if prefix else key for key in storage.list(prefix)]
    else:
        names = list(only)
    paths = [local_path(target, name, field) for name in names]  # refuse before writing anything
    files = []
    for name, path in zip(names, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(join(prefix, name), path)
        files.append(path)
    return files
