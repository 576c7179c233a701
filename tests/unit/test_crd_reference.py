"""docs/crd-reference.md is generated from the spec models (`kubeforge crds`) and names every field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from support.jobs import ROOT

from kubeforge.crds import reference
from kubeforge.spec import FinetuneJob, PretrainJob

REFERENCE = ROOT / "docs" / "crd-reference.md"


def test_the_reference_matches_the_models() -> None:
    assert REFERENCE.read_text() == reference(), f"{REFERENCE} is stale: run `kubeforge crds` and commit it"


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The model inside `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType, list):
        for argument in get_args(annotation):
            found = model_of(argument)
            if found:
                return found
    return None


def is_list(annotation: Any) -> bool:
    """`list[X]` or `list[X] | None`: the reference names its items' fields `path[].field`."""
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def field_paths(model: type[BaseModel], prefix: str) -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        paths.append(path)
        nested = model_of(info.annotation)
        if nested:
            paths += field_paths(nested, path + ("[]" if is_list(info.annotation) else ""))
    return paths


def test_every_field_of_every_kind_is_documented() -> None:
    text = REFERENCE.read_text()
    pretrain, finetune = text.split("## FinetuneJob")
    for model, section in ((PretrainJob, pretrain), (FinetuneJob, finetune)):
        spec = model.model_fields["spec"].annotation
        assert isinstance(spec, type) and issubclass(spec, BaseModel)
        paths = field_paths(spec, "spec")
        assert len(paths) > 30
        for path in paths:
            row = next((line for line in section.splitlines() if line.startswith(f"| `{path}` |")), None)
            assert row is not None, f"{model.__name__} {path} is missing"
            assert row.rstrip(" |").split("|")[-1].strip(), f"{path} has no description"


def test_kubeforge_crds_writes_it(tmp_path: Path) -> None:
    target = tmp_path / "reference.md"
    subprocess.run([sys.executable, "-m", "kubeforge", "crds", "--output", str(tmp_path / "crds"),
                    "--reference", str(target)], check=True, capture_output=True)
    assert target.read_text() == REFERENCE.read_text()
    assert sorted(p.name for p in (tmp_path / "crds").iterdir()) == sorted(p.name for p in (ROOT / "crds").iterdir())
