"""baseModel.uri: hf://ORG/NAME[@REVISION]: fetched from the Hub once into the job's storage, then reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support.hub import FakeHub, serving
from support.jobs import write_manifest
from support.models import finetune_manifest, tiny_base
from support.processes import free_port, run_cli

from kubeforge.status import EXIT_PERMANENT


def train_from_hub(uri: str, hub: FakeHub, tmp_path: Path, name: str,
                   processes: int = 1) -> tuple[int, dict[str, object], str]:
    """`kubeforge train` of a 1-step finetune from `uri`, its cache under tmp_path/cache; with
    `processes`, as a pod of that many processes runs it."""
    job = finetune_manifest(uri, tmp_path / name, max_steps=1)
    termination = tmp_path / f"{name}-termination"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_TOKEN": "hf_secret-token-never-logged", "HF_HUB_DISABLE_TELEMETRY": "1"}
    launch = ["--processes", str(processes)] if processes > 1 else []
    if processes > 1:
        env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_cli("train", "--spec", str(write_manifest(tmp_path / f"{name}.yaml", job)),
                     "--base-model-cache", str(tmp_path / "cache"), "--termination-log", str(termination),
                     *launch, env=env, timeout=300)
    assert "hf_secret-token-never-logged" not in result.stderr + result.stdout + termination.read_text()
    return result.returncode, json.loads(termination.read_text()), result.stderr


def test_a_hub_model_is_fetched_once_into_the_jobs_storage_and_reused(tmp_path: Path) -> None:
    hub = FakeHub({"tiny-org/tiny-gpt2": tiny_base(tmp_path / "served")}, revisions=("main", "v1"))
    with serving(hub):
        code, outcome, stderr = train_from_hub("hf://tiny-org/tiny-gpt2@v1", hub, tmp_path, "first")
        assert code == 0, stderr[-3000:]
        fetched = len(hub.requests)
        assert hub.requests[0] == "GET /api/models/tiny-org/tiny-gpt2/revision/v1", hub.requests
        assert any(r.startswith("GET ") and r.endswith("/model.safetensors") for r in hub.requests), hub.requests
        cached = tmp_path / "cache" / "tiny-org" / "tiny-gpt2" / "v1"
        assert {"config.json", "model.safetensors", "manifest.json"} <= {p.name for p in cached.iterdir()}
        # A later job (another pod, a restart) on the same revision: from the job storage, the Hub not asked.
        code, outcome, stderr = train_from_hub("hf://tiny-org/tiny-gpt2@v1", hub, tmp_path, "second")
        assert code == 0, stderr[-3000:]
        assert len(hub.requests) == fetched, hub.requests[fetched:]
        assert outcome["step"] == 1


def test_two_processes_ask_the_hub_once_rank_0_fetching_while_the_other_waits(tmp_path: Path) -> None:
    hub = FakeHub({"tiny-org/tiny-gpt2": tiny_base(tmp_path / "served")})
    with serving(hub):
        code, outcome, stderr = train_from_hub("hf://tiny-org/tiny-gpt2", hub, tmp_path, "pair", processes=2)
    assert code == 0, stderr[-3000:]
    assert outcome["step"] == 1
    asked = [r for r in hub.requests if r.startswith("GET /api/models/tiny-org/tiny-gpt2/revision/")]
    weights = [r for r in hub.requests if r.startswith("GET ") and r.endswith("/model.safetensors")]
    assert len(asked) == 1 and len(weights) == 1, hub.requests  # rank 1 read rank 0's committed copy


def test_a_missing_hub_repo_or_revision_fails_for_good_naming_the_field(tmp_path: Path) -> None:
    hub = FakeHub({"tiny-org/tiny-gpt2": tiny_base(tmp_path / "served")})
    with serving(hub):
        for uri, words in [("hf://tiny-org/no-such-model", "no model repository tiny-org/no-such-model on the Hub"),
                           ("hf://tiny-org/tiny-gpt2@v9", "has no revision 'v9'")]:
            code, outcome, stderr = train_from_hub(uri, hub, tmp_path, uri.rsplit("/", 1)[1].replace("@", "-"))
            assert code == EXIT_PERMANENT, stderr[-3000:]
            assert outcome["permanent"] is True
            assert str(outcome["error"]).startswith(f"baseModel.uri: {uri}: ") and words in str(outcome["error"])


def test_a_hub_model_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    served = tiny_base(tmp_path / "served")
    (served / "model.safetensors").rename(served / "pytorch_model.bin")  # what an old upload holds
    hub = FakeHub({"old-org/pickled": served})
    with serving(hub):
        code, outcome, stderr = train_from_hub("hf://old-org/pickled", hub, tmp_path, "pickled")
    assert code == EXIT_PERMANENT, stderr[-3000:]
    assert "has no .safetensors weights; kubeforge does not load pickled weights" in str(outcome["error"])
    assert not any("pytorch_model.bin" in r for r in hub.requests)  # never even downloaded
    assert not (tmp_path / "cache" / "old-org").exists()  # and nothing committed for later jobs
