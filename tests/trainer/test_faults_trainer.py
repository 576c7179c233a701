"""Fault injection, trainer side: real `kubeforge train` processes killed, stopped, starved of S3 and
fed corrupt checkpoints. Each test prints its figures into the table at the end of the run
(docs/reliability.md keeps the full-size one: `pytest -m faults --fault-size full`)."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support.corruption import (
    committed_steps,
    flip_a_byte,
    garble_the_manifest,
    make_it_another_jobs,
    remove_a_file,
    truncate,
)
from support.faults import FAULT_RESULTS, RESUMED_LINE, STEP_LINE
from support.jobs import ROOT, tiny_pretrain, write_manifest
from support.processes import KUBEFORGE, stop_process, wait_until

from kubeforge.status import EXIT_PERMANENT, EXIT_PREEMPTED
from kubeforge.storage import S3Storage
from kubeforge.trainer.checkpoint import Checkpointer, load_checkpoint, step_prefix

pytestmark = pytest.mark.faults

INTERVAL = 10
#: Optimizer steps of the killed and stopped jobs, per --fault-size: enough for every round to progress.
STEPS = {"ci": 40, "full": 250}
ROUNDS = {"ci": {"sigkill": 2, "sigterm": 2, "s3": 1}, "full": {"sigkill": 20, "sigterm": 10, "s3": 5}}
OUTAGE_SECONDS = {"ci": 5.0, "full": 30.0}
SEED = 11  # where the kills land: fixed, so a failure can be replayed


@pytest.fixture(autouse=True)
def no_trainer_outlives_its_test() -> Iterator[None]:
    yield
    while Trainer.started:
        stop_process(Trainer.started.pop().process)


class Trainer:
    """A `kubeforge train` process whose log is read on a thread: the step it reached, what it said."""

    #: Every one started, so that a failing test's trainers are stopped with it (they train for hours).
    started: ClassVar[list[Trainer]] = []

    def __init__(self, manifest: Path, uri: str, workdir: Path, env: dict[str, str] | None = None):
        self.termination = workdir / f"termination-{time.monotonic_ns()}"
        self.result = workdir / "result.json"
        self.process = subprocess.Popen(
            [*KUBEFORGE, "train", "--spec", str(manifest), "--checkpoint-uri", uri, "--result", str(self.result),
             "--termination-log", str(self.termination)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.step = 0
        self.resumed: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started.append(self)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := STEP_LINE.search(line):
                self.step = int(match[1])
            elif match := RESUMED_LINE.search(line):
                self.resumed = int(match[1])

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        wait_until(lambda: self.step >= step or self.process.poll() is not None, timeout, f"step {step}")
        assert self.process.poll() is None, f"the trainer exited before step {step}:\n{self.log[-3000:]}"

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            self.process.kill()
        self._reader.join(30)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def outcome(self) -> dict[str, Any]:
        return dict(json.loads(self.termination.read_text()))


def job_manifest(tmp_path: Path, steps: int, **checkpoint: Any) -> Path:
    job = tiny_pretrain("faulty", maxSteps=steps, warmupSteps=5, evalInterval=100000, evalBatches=4, logInterval=1)
    job["spec"]["checkpoint"] = {"intervalSteps": INTERVAL, "keep": 3, **checkpoint}
    return write_manifest(tmp_path / "job.yaml", job)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, fault_size: str) -> dict[str, Any]:
    """The job run once without faults: its result, and its checkpoints to corrupt."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    manifest = job_manifest(workdir, STEPS[fault_size])
    trainer = Trainer(manifest, str(workdir / "checkpoints"), workdir)
    assert trainer.finish() == 0, trainer.log[-3000:]
    return {"result": json.loads(trainer.result.read_text()), "checkpoints": workdir / "checkpoints",
            "manifest": manifest}


def eval_loss(result: dict[str, Any]) -> float:
    return float(result["finalEval"]["loss"])


def test_sigkill_at_random_steps_loses_at_most_one_interval(tmp_path: Path, fault_size: str,
                                                           uninterrupted: dict[str, Any]) -> None:
    steps, rounds = STEPS[fault_size], ROUNDS[fault_size]["sigkill"]
    rng = random.Random(SEED)
    checkpoints = tmp_path / "checkpoints"
    lost: list[int] = []
    expected_resume = 0
    for _ in range(rounds):
        trainer = Trainer(uninterrupted["manifest"], str(checkpoints), tmp_path)
        target = rng.randint(expected_resume + 1, min(expected_resume + INTERVAL + 5, steps - 5))
        trainer.wait_for_step(target)
        assert (trainer.resumed or 0) == expected_resume, trainer.log[-3000:]
        trainer.process.send_signal(signal.SIGKILL)
        assert trainer.finish() == -signal.SIGKILL
        newest = (committed_steps(checkpoints) or [0])[-1]
        lost.append(trainer.step - newest)
        assert 0 <= trainer.step - newest <= INTERVAL, f"killed at step {trainer.step}, newest checkpoint {newest}"
        expected_resume = newest
    final = Trainer(uninterrupted["manifest"], str(checkpoints), tmp_path)
    assert final.finish() == 0, final.log[-3000:]
    assert final.resumed == expected_resume
    result = json.loads(final.result.read_text())
    difference = abs(eval_loss(result) - eval_loss(uninterrupted["result"]))
    assert result["step"] == steps and difference < 1e-3
    FAULT_RESULTS.append((
        "SIGKILL the trainer at a random step", f"{rounds} times",
        f"{rounds}/{rounds} resumed; at most one interval ({INTERVAL} steps) lost each",
        f"steps lost per kill max {max(lost)}, mean {sum(lost) / len(lost):.1f}; final eval loss "
        f"{eval_loss(result):.4f} vs {eval_loss(uninterrupted['result']):.4f} uninterrupted (|diff| {difference:.1e})"))


def test_sigterm_loses_no_step(tmp_path: Path, fault_size: str, uninterrupted: dict[str, Any]) -> None:
    steps, rounds = STEPS[fault_size], ROUNDS[fault_size]["sigterm"]
    rng = random.Random(SEED + 1)
    checkpoints = tmp_path / "checkpoints"
    lost = 0
    stop_seconds: list[float] = []
    stopped_at = 0
    for _ in range(rounds):
        trainer = Trainer(uninterrupted["manifest"], str(checkpoints), tmp_path)
        trainer.wait_for_step(rng.randint(stopped_at + 1, min(stopped_at + INTERVAL + 5, steps - 5)))
        lost += stopped_at - (trainer.resumed or 0)
        sent = time.monotonic()
        trainer.process.send_signal(signal.SIGTERM)
        assert trainer.finish() == EXIT_PREEMPTED, trainer.log[-3000:]
        stop_seconds.append(time.monotonic() - sent)
        stopped_at = trainer.step
        assert committed_steps(checkpoints)[-1] == stopped_at  # the step it finished, committed
        assert trainer.outcome() == {"error": f"stopped on SIGTERM at step {stopped_at} of {steps}, its "
                                              "checkpoint committed", "permanent": False}
    final = Trainer(uninterrupted["manifest"], str(checkpoints), tmp_path)
    assert final.finish() == 0, final.log[-3000:]
    lost += stopped_at - (final.resumed or 0)
    result = json.loads(final.result.read_text())
    difference = abs(eval_loss(result) - eval_loss(uninterrupted["result"]))
    assert lost == 0 and result["step"] == steps and difference < 1e-3
    FAULT_RESULTS.append((
        "SIGTERM the trainer (preemption, suspend)", f"{rounds} times", "0 steps lost; exit 143",
        f"{lost} steps lost; SIGTERM to exit max {max(stop_seconds):.1f}s; final eval loss "
        f"{eval_loss(result):.4f} vs {eval_loss(uninterrupted['result']):.4f} uninterrupted (|diff| {difference:.1e})"))


# -- corrupt checkpoints ---------------------------------------------------------------------------


#: way -> (corrupt, what must hold). CI runs the first two; unit tests cover all in test_checkpoint.py.
CORRUPTIONS = {"byte flip": flip_a_byte, "foreign job": make_it_another_jobs, "truncation": truncate,
               "missing file": remove_a_file, "bad manifest": garble_the_manifest}


def test_a_corrupt_newest_checkpoint_is_passed_over_or_fails_permanently(
        tmp_path: Path, fault_size: str, uninterrupted: dict[str, Any]) -> None:
    ways = list(CORRUPTIONS) if fault_size == "full" else list(CORRUPTIONS)[:2]
    newest = committed_steps(uninterrupted["checkpoints"])[-1]
    outcomes = []
    for way in ways:
        checkpoints = tmp_path / way.replace(" ", "-")
        shutil.copytree(uninterrupted["checkpoints"], checkpoints)
        CORRUPTIONS[way](checkpoints / step_prefix(newest))
        trainer = Trainer(uninterrupted["manifest"], str(checkpoints), tmp_path)
        code = trainer.finish()
        if way == "foreign job":
            assert code == EXIT_PERMANENT, trainer.log[-3000:]
            error = trainer.outcome()
            assert error["permanent"] and error["error"].startswith("spec.checkpoint.uri: ")
            assert "belongs to PretrainJob default/someone-else" in error["error"]
            outcomes.append(f"{way}: failed permanently (exit 2, names spec.checkpoint.uri)")
        else:
            assert code == 0, trainer.log[-3000:]
            assert "quarantined" in trainer.log and trainer.resumed == newest - INTERVAL
            result = json.loads(trainer.result.read_text())
            assert abs(eval_loss(result) - eval_loss(uninterrupted["result"])) < 1e-3
            outcomes.append(f"{way}: resumed from step {trainer.resumed}")
    FAULT_RESULTS.append((
        "corrupt newest checkpoint", f"{len(ways)} ways",
        "resumes from the newest good one, or fails permanently with a named reason", "; ".join(outcomes)))


# -- S3 unavailable --------------------------------------------------------------------------------


class FaultyProxy:
    """A TCP proxy in front of an S3 endpoint that can stop listening (connections refused, as a
    stopped server) or answer every request 500, cutting the connections it holds when a fault starts."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.mode = "pass"
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the "server" is down
            if self.mode == "500":
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._connections |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _refuse(client: socket.socket) -> None:
        with client:
            client.settimeout(5)
            try:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def fault(self, mode: str) -> None:
        self.mode = mode
        if mode == "down":
            self._listener.close()
        self._cut()

    def heal(self) -> None:
        if self.mode == "down":
            self._listen()
        self.mode = "pass"

    def close(self) -> None:
        self._listener.close()
        self._cut()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield faulty
    faulty.close()


def verify_newest(storage: S3Storage, scratch: Path) -> int | None:
    """The newest committed checkpoint's step, after checking every file against its manifest
    (CorruptCheckpoint fails the test): what a resume would read. Retention never deletes the newest."""
    committed = Checkpointer(storage, keep=3, spec_hash="", rank=1).committed()
    if not committed:
        return None
    load_checkpoint(storage, committed[-1], scratch / f"{time.monotonic_ns()}", "spec.checkpoint.uri")
    return committed[-1].step


def test_s3_outage_during_saves_leaves_no_corrupt_checkpoint(tmp_path: Path, fault_size: str, bucket: str,
                                                             s3_env: dict[str, str], proxy: FaultyProxy) -> None:
    rounds, seconds = ROUNDS[fault_size]["s3"], OUTAGE_SECONDS[fault_size]
    manifest = job_manifest(tmp_path, 100000, intervalSteps=5)
    env = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "2"}
    figures = []
    for round_ in range(rounds):
        mode = ("500", "down")[round_ % 2]
        uri = f"s3://{bucket}/outage-{round_}"
        direct = S3Storage(uri)  # moto itself, behind no proxy: what any reader would see
        trainer = Trainer(manifest, uri, tmp_path, env)
        before = wait_until(lambda: verify_newest(direct, tmp_path), 180, "a first committed checkpoint")  # noqa: B023
        step_at_fault = trainer.step
        proxy.fault(mode)
        samples = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert (verify_newest(direct, tmp_path) or 0) >= before  # the last good one stays intact
            samples += 1
            time.sleep(0.5)
        step_after_fault = trainer.step
        proxy.heal()
        after = wait_until(lambda: (verify_newest(direct, tmp_path) or 0) > step_after_fault,  # noqa: B023
                           180, "a checkpoint committed after the outage") and verify_newest(direct, tmp_path)
        trainer.process.send_signal(signal.SIGTERM)
        code = trainer.finish()
        assert code == EXIT_PREEMPTED, trainer.log[-3000:]
        failed = trainer.log.count("checkpoint upload failed")
        assert failed >= 1, "the outage did not meet a save: the fault was not injected"
        assert verify_newest(direct, tmp_path) == trainer.step  # the graceful stop's checkpoint, whole
        figures.append(f"{mode} {seconds:.0f}s: {failed} saves failed, trained steps {step_at_fault}->"
                       f"{step_after_fault} during it, {samples} reads all intact, committed again at {after}")
    FAULT_RESULTS.append((
        "S3 unavailable or answering 500 during saves", f"{rounds} times, {seconds:.0f} s each",
        "0 corrupt or half-visible checkpoints; training goes on; the last good checkpoint intact",
        "; ".join(figures)))
