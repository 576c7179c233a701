"""Committed checkpoints in a local directory (each with its manifest.json): which steps are there,
and ways one gets corrupted. Shared by the checkpoint unit tests, the resume tests and the fault suite."""

from __future__ import annotations

import json
from pathlib import Path


def committed_steps(checkpoints: Path) -> list[int]:
    """The steps of the checkpoints whose manifest was written, under a job's checkpoint directory."""
    return sorted(json.loads(m.read_text())["step"] for m in checkpoints.glob("checkpoints/*/manifest.json"))


def flip_a_byte(directory: Path, name: str = "model.pt") -> None:
    target = directory / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def truncate(directory: Path) -> None:
    """model.pt cut to its first 100 bytes, as a torn write leaves it."""
    model = directory / "model.pt"
    model.write_bytes(model.read_bytes()[:100])


def remove_a_file(directory: Path) -> None:
    (directory / "optimizer.pt").unlink()


def garble_the_manifest(directory: Path) -> None:
    (directory / "manifest.json").write_text('{"step": 20, "files": [')


def make_it_another_jobs(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["job"]["name"] = "someone-else"
    (directory / "manifest.json").write_text(json.dumps(manifest))
