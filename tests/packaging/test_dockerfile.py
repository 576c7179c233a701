"""The Dockerfile, checked without a Docker engine: what each image is built from, copies, installs,
runs and as whom. `docker build` itself is in the README's "Try it on kind" (hack/kind-e2e.sh).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from support.jobs import ROOT

from kubeforge.cli import build_parser

TARGETS = ("operator", "trainer-cpu", "trainer")
NON_ROOT_UID = "10001"  # kubeforge.operator.builders.TRAINER_UID and the chart's runAsUser


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile: continuations joined, comments dropped."""
    logical = re.sub(r"\\\n(\s*#.*\n)*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    arguments: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = stages[match[2]] = Stage(match[2], match[1])
        elif current is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            arguments[name] = default
        else:
            current.instructions.append((instruction, rest))
    return arguments, stages


ARGUMENTS, STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())


def lineage(name: str) -> list[Stage]:
    """The stage and every stage it builds on or copies from."""
    stage = STAGES[name]
    found = [stage]
    if stage.base in STAGES:
        found += lineage(stage.base)
    for copy in stage.all("COPY"):
        source = re.match(r"--from=(\S+)", copy)
        if source and source[1] in STAGES:
            found += lineage(source[1])
    return found


def base_image(stage: Stage) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGUMENTS[m[1]], stage.base)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps path out of the build context (Docker's rules: the last matching
    pattern wins, and a pattern matching a parent directory matches the path)."""
    excluded = False
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_targets_exist_with_pinned_bases() -> None:
    assert set(TARGETS) <= set(STAGES)
    for stage in STAGES.values():
        image = base_image(stage)
        if stage.base in STAGES:
            continue
        assert re.search(r"@sha256:[0-9a-f]{64}$", image) or re.search(r":\d+(\.\d+)+[-\w.]*$", image), (
            f"{stage.name}: {image} is not pinned to a digest or an exact version")
    assert base_image(STAGES["trainer"]).startswith("nvidia/cuda:")


def test_every_copy_source_is_in_the_build_context() -> None:
    copied = []
    for stage in STAGES.values():
        for arguments in stage.all("COPY"):
            if arguments.startswith("--from="):
                source_stage = arguments.split()[0].removeprefix("--from=")
                assert source_stage in STAGES, f"{stage.name}: COPY from unknown stage {source_stage}"
                continue
            *sources, _destination = shlex.split(arguments)
            for source in sources:
                assert (ROOT / source).exists(), f"{stage.name}: COPY {source}: no such file"
                assert not dockerignored(source), f"{stage.name}: COPY {source}: excluded by .dockerignore"
                copied.append(source)
    assert {"pyproject.toml", "kubeforge", "operator", "trainer", "examples/data"} <= set(copied)
    # What must never reach the context: the venv, git history, local runs.
    for path in (".venv/bin/python", ".git/HEAD", "kubeforge-runs/x", "tests/conftest.py", "kubeforge/__pycache__/x"):
        assert dockerignored(path), path


def test_the_dockerignore_check_can_fail() -> None:
    assert not dockerignored("kubeforge/cli.py")
    assert dockerignored("bench/throughput.py")


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_console_script_and_the_command_parses(target: str) -> None:
    stage = STAGES[target]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(stage.all("ENTRYPOINT")[-1]) == ["kubeforge"] and scripts["kubeforge"] == "kubeforge.cli:main"
    command = json.loads(stage.all("CMD")[-1])
    args = build_parser().parse_args(command)
    assert args.command == ("operator" if target == "operator" else "train")
    if target != "operator":
        # The operator's pods hand the job over in this variable (docs/pod-contract.md).
        assert args.spec_env == "KUBEFORGE_JOB"
    env = " ".join(stage.all("ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env, "the console script is on PATH for the pods' `command`"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stages_run_as_non_root_without_build_tools(target: str) -> None:
    stage = STAGES[target]
    assert stage.all("USER")[-1] == f"{NON_ROOT_UID}:{NON_ROOT_UID}"
    runs = " ".join(stage.all("RUN"))
    for tool in ("gcc", "g++", "build-essential", "make ", "git", "pip install", "pip wheel", "-venv", "-dev"):
        assert tool not in runs, f"{target} installs {tool.strip()}"
    assert len([c for c in stage.all("COPY") if c.startswith("--from=")]) == 1, "only the venv comes from a build"
    labels = " ".join(stage.all("LABEL"))
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_the_operator_image_carries_no_torch() -> None:
    stages = lineage("operator")
    installs = " ".join(run for stage in stages for run in stage.all("RUN"))
    assert "torch" not in installs and "[trainer]" not in installs
    assert "kubeforge-*.whl " in installs + " ", "the operator installs kubeforge without extras"
    # ...and kubeforge without extras depends on no torch, however deep (in this environment's versions).
    assert not {"torch", "transformers", "peft", "accelerate"} & dependency_closure("kubeforge")
    # The trainer images do get it, the CPU one from the CPU wheel index.
    cpu_installs = " ".join(run for stage in lineage("trainer-cpu") for run in stage.all("RUN"))
    assert '${TORCH_INDEX_ARGS} "torch==${TORCH_VERSION}"' in cpu_installs
    assert "--index-url https://download.pytorch.org/whl/cpu" in ARGUMENTS["TORCH_INDEX_ARGS"], (
        "by default, the CPU wheel index: no CUDA build")
    # Where no index is reachable, one build argument names what is (hack/build-images.sh --local).
    for stage in ("wheel", "operator-venv", "trainer-cpu-venv", "trainer-venv"):
        assert all("_INDEX_ARGS}" in run for run in STAGES[stage].all("RUN") if "pip " in run), stage
    trainer_extra = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["trainer"]]
    torch = next(r for r in trainer_extra if r.name == "torch")
    assert torch.specifier.contains(ARGUMENTS["TORCH_VERSION"]), "the images' torch is outside the trainer extra"


def dependency_closure(distribution: str) -> set[str]:
    """Names of every distribution `pip install distribution` (no extras) would install."""
    seen: set[str] = set()
    pending = [distribution]
    while pending:
        name = pending.pop()
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            key = requirement.name.lower().replace("_", "-")
            if key not in seen:
                seen.add(key)
                pending.append(requirement.name)
    return seen


def test_the_dependency_closure_sees_torch_when_it_is_there() -> None:
    assert "torch" in dependency_closure("peft")
