"""The job state machine as a pure function: observed pods and jobs in, status and actions out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from support.jobs import DELETE, SETTINGS, UID, example, job, with_change

from kubeforge.operator.builders import build_pods
from kubeforge.operator.contract import LaunchPlan
from kubeforge.operator.lifecycle import Observed, Plan, Progress, reconcile
from kubeforge.operator.pods import PodView

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
CKPT = "s3://models/kf/default/pretrainjob/tiny-shakespeare-6c1f0e2a"


def pods(the_job: Any, attempt: int = 0, phases: list[str] | None = None, **terminated: Any) -> list[dict[str, Any]]:
    """The job's pods as the API would return them, in the given phases."""
    made = build_pods(the_job, attempt, LaunchPlan(CKPT, None, True), SETTINGS)
    for pod, phase in zip(made, phases or ["Running"] * len(made), strict=True):
        pod["status"] = {"phase": phase, "podIP": "10.0.0.5"}
        if phase in ("Succeeded", "Failed"):
            pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
                "exitCode": 0 if phase == "Succeeded" else terminated.get("exit_code", 1),
                "message": terminated.get("message", "")}}}]
    return made


def decide(the_job: Any, status: dict[str, Any] | None = None, observed_pods: list[dict[str, Any]] | None = None,
           gpu_nodes: bool = True, now: datetime = NOW, **extra: Any) -> Plan:
    views = [PodView.parse(pod) for pod in observed_pods or []]
    return reconcile(Observed(job=the_job, status=status or {}, pods=views, gpu_nodes=gpu_nodes,
                              checkpoint_uri=CKPT, generation=3, **extra), now)


def condition(plan: Plan, kind: str) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == kind)


def test_a_new_job_gets_pods_and_is_pending() -> None:
    plan = decide(job())
    assert plan.launch == LaunchPlan(CKPT, None, cpu_fallback=False)
    assert plan.status["phase"] == "Pending" and plan.status["restarts"] == 0
    assert plan.status["checkpointUri"] == CKPT and plan.status["observedGeneration"] == 3
    assert plan.events == [("Normal", "PodsCreated", "1 worker(s) created")]


def test_replaying_a_decision_changes_nothing() -> None:
    first = decide(job(), observed_pods=pods(job()))
    again = decide(job(), status=first.status, observed_pods=pods(job()), now=NOW + timedelta(seconds=30))
    assert again.status == first.status and again.events == [] and again.launch is None
    assert condition(again, "Running")["lastTransitionTime"] == "2026-11-23T12:00:00Z"


def test_running_with_progress_from_the_trainer() -> None:
    progress = Progress(step=120, total_steps=500, loss=3.21, eval_metrics={"loss": 3.5, "perplexity": 33.1},
                        last_checkpoint_step=100, trainable_parameters=16_512)
    plan = decide(job(), observed_pods=pods(job()), progress=progress)
    status = plan.status
    assert status["phase"] == "Running" and status["startTime"] == "2026-11-23T12:00:00Z"
    assert status["trainableParameters"] == 16_512
    assert status["stepProgress"] == "120/500" and status["loss"] == 3.21
    assert status["evalMetrics"] == {"loss": 3.5, "perplexity": 33.1} and status["lastCheckpointStep"] == 100
    running = condition(plan, "Running")
    assert running["status"] == "True" and running["observedGeneration"] == 3


def test_success_reads_the_trainers_summary() -> None:
    summary = {"step": 300, "totalSteps": 300, "trainLoss": 4.6, "finalEval": {"loss": 4.8},
               "exportUri": CKPT + "/export", "checkpointUri": CKPT, "resumedFromStep": 0,
               "trainableParameters": 220_000}
    plan = decide(job(), status={"phase": "Running", "restarts": 0},
                  observed_pods=pods(job(), phases=["Succeeded"], message=json.dumps(summary)))
    assert plan.status["phase"] == "Succeeded" and plan.status["exportUri"] == CKPT + "/export"
    assert plan.status["trainableParameters"] == 220_000
    assert plan.status["stepProgress"] == "300/300" and plan.status["loss"] == 4.6
    assert plan.status["completionTime"] == "2026-11-23T12:00:00Z"
    assert plan.events == [("Normal", "Completed", f"trained to step 300; model at {CKPT}/export")]
    assert "compression" not in plan.status


def test_success_reports_what_quantization_cost() -> None:
    """export.quantize: the trainer's measurements of both models land in the status, for kubectl get."""
    compression = {"quantize": "int8", "scheme": "int8 weights (W8A16)", "sizeRatio": 0.31,
                   "summary": "int8: 31% of the size, accuracy 0.7100 -> 0.7000",
                   "full": {"uri": CKPT + "/export", "sizeBytes": 1000, "eval": {"accuracy": 0.71}},
                   "quantized": {"uri": CKPT + "/export/int8", "sizeBytes": 310, "eval": {"accuracy": 0.7}}}
    summary = {"step": 300, "totalSteps": 300, "finalEval": {"accuracy": 0.71}, "exportUri": CKPT + "/export",
               "checkpointUri": CKPT, "resumedFromStep": 0, "compression": compression}
    plan = decide(job(), status={"phase": "Running", "restarts": 0},
                  observed_pods=pods(job(), phases=["Succeeded"], message=json.dumps(summary)))
    assert plan.status["phase"] == "Succeeded" and plan.status["compression"] == compression


def test_any_worker_failing_replaces_every_worker() -> None:
    two = job(resources={"workers": 2})
    observed = pods(two, phases=["Running", "Failed"], exit_code=137, message="killed")
    plan = decide(two, status={"phase": "Running", "restarts": 0}, observed_pods=observed)
    assert plan.status["phase"] == "Restarting" and plan.status["restarts"] == 1
    assert sorted(plan.delete_pods) == ["tiny-shakespeare-ptj-w0-a0", "tiny-shakespeare-ptj-w1-a0"]
    assert plan.events[0][0:2] == ("Warning", "GangRestart")
    assert "worker 1 exited with code 137: killed" in plan.events[0][2]
    # Next round: the old pods are going away, the new gang (attempt 1) is created.
    dying = [dict(p, metadata={**p["metadata"], "deletionTimestamp": "2026-11-23T12:00:01Z"}) for p in observed]
    after = decide(two, status=plan.status, observed_pods=dying)
    assert after.launch is not None and after.status["phase"] == "Restarting" and after.status["restarts"] == 1


def test_a_vanished_worker_counts_as_a_failure() -> None:
    two = job(resources={"workers": 2})
    plan = decide(two, status={"phase": "Running", "restarts": 0}, observed_pods=pods(two)[:1])
    assert plan.status["restarts"] == 1 and "worker 1 disappeared" in plan.status["message"]


def test_backoff_limit_ends_in_failed() -> None:
    limited = job(backoffLimit=2)
    plan = decide(limited, status={"phase": "Running", "restarts": 2},
                  observed_pods=pods(limited, attempt=2, phases=["Failed"], exit_code=1, message="boom"))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "BackoffLimitExceeded"
    assert "2 restart(s), backoffLimit 2: worker 0 exited with code 1: boom" in plan.status["message"]
    assert condition(plan, "Failed")["status"] == "True"


def test_a_permanent_exit_is_not_retried() -> None:
    error = json.dumps({"error": "data.train: no .txt or .jsonl files found", "permanent": True})
    plan = decide(job(), status={"phase": "Running", "restarts": 0},
                  observed_pods=pods(job(), phases=["Failed"], exit_code=2, message=error))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "PermanentError"
    assert plan.status["restarts"] == 0 and "no .txt or .jsonl files found" in plan.status["message"]


def test_cpu_fallback_when_no_gpu_node_and_allowed() -> None:
    plan = decide(job(), gpu_nodes=False)
    assert plan.launch is not None and plan.launch.cpu_fallback is True
    assert condition(plan, "CPUFallback")["status"] == "True" and plan.status["device"] == "cpu"


def test_waiting_for_gpus_when_fallback_is_forbidden() -> None:
    strict = job(resources={"allowCpuFallback": False})
    plan = decide(strict, gpu_nodes=False)
    assert plan.launch is None and plan.status["phase"] == "Pending"
    assert condition(plan, "WaitingForGPU")["reason"] == "NoGPUNodes"
    assert plan.events[0][:2] == ("Warning", "WaitingForGPU")


def test_suspend_deletes_pods_and_resume_recreates_them() -> None:
    running = pods(job())
    plan = decide(job(suspend=True), status={"phase": "Running", "restarts": 0}, observed_pods=running)
    assert plan.status["phase"] == "Suspended" and plan.delete_pods == ["tiny-shakespeare-ptj-w0-a0"]
    resumed = decide(job(), status=plan.status)
    assert resumed.launch is not None and resumed.status["phase"] == "Pending"
    assert condition(resumed, "Suspended")["status"] == "False" and resumed.status["restarts"] == 0


def test_finetune_waits_for_its_pretrain_job() -> None:
    finetune = job(example("finetune-lora-classify.yaml")[0])
    missing = decide(finetune)
    assert missing.launch is None and condition(missing, "WaitingForBaseModel")["reason"] == "BaseModelMissing"
    running_base = {"status": {"phase": "Running", "stepProgress": "10/300"}}
    waiting = decide(finetune, status=missing.status, base_job=running_base)
    assert condition(waiting, "WaitingForBaseModel")["reason"] == "BaseModelNotReady"
    assert "step 10/300" in waiting.status["message"]
    failed = decide(finetune, base_job={"status": {"phase": "Failed", "message": "out of memory"}})
    assert condition(failed, "WaitingForBaseModel")["reason"] == "BaseModelFailed" and failed.launch is None
    assert failed.status["phase"] == "Failed" and failed.status["reason"] == "BaseModelFailed"
    assert "PretrainJob tiny-shakespeare, failed: out of memory" in failed.status["message"]
    done = {"status": {"phase": "Succeeded", "exportUri": "s3://models/kf/default/pretrainjob/tiny/export"}}
    ready = decide(finetune, status=waiting.status, base_job=done)
    assert ready.launch is not None and ready.launch.base_model_uri == done["status"]["exportUri"]
    assert condition(ready, "WaitingForBaseModel")["status"] == "False"


SWEEP_BEST = "s3://models/kf/default/finetunejob/lr-search-t3/export"


def from_sweep(**spec: Any) -> Any:
    return job(example("finetune-lora-classify.yaml")[0], baseModel={"fromSweepJob": "lr-search"}, **spec)


def test_a_finetune_from_a_sweep_waits_for_it_then_starts_from_its_best_trial() -> None:
    finetune = from_sweep()
    missing = decide(finetune)
    assert missing.launch is None and condition(missing, "WaitingForBaseModel")["reason"] == "BaseModelMissing"
    assert missing.status["message"] == "SweepJob lr-search does not exist in namespace default"
    best = {"name": "lr-search-t3", "number": 3, "parameters": {"lora.r": 8}, "value": 0.81, "exportUri": SWEEP_BEST}
    running = {"status": {"phase": "Running", "trialsProgress": "3/6", "bestTrial": best}}
    waiting = decide(finetune, status=missing.status, base_job=running)
    assert waiting.launch is None and waiting.status["reason"] == "WaitingForBaseModel"
    assert waiting.status["message"] == "waiting for SweepJob lr-search to succeed (now Running, 3/6 trials done)"
    assert waiting.events == []  # still pending, still waiting: no second warning
    done = {"status": {"phase": "Succeeded", "trialsProgress": "6/6", "bestTrial": best}}
    ready = decide(finetune, status=waiting.status, base_job=done)
    assert ready.launch is not None and ready.launch.base_model_uri == SWEEP_BEST
    assert ready.status["baseModelUri"] == SWEEP_BEST  # lineage: the model it started from
    ready_condition = condition(ready, "WaitingForBaseModel")
    assert ready_condition["status"] == "False" and ready_condition["reason"] == "BaseModelReady"
    assert "SweepJob lr-search's best trial lr-search-t3" in ready_condition["message"]
    # The sweep, deleted with its trials after the finetune started: the finetune keeps its base model.
    relaunched = decide(finetune, status={**ready.status, "phase": "Restarting", "restarts": 1}, base_job=None)
    assert relaunched.launch is not None and relaunched.launch.base_model_uri == SWEEP_BEST


def test_a_finetune_from_a_sweep_that_failed_fails() -> None:
    failed = decide(from_sweep(), base_job={"status": {"phase": "Failed", "reason": "NoSuccessfulTrial",
                                                       "message": "none of 6 trials succeeded"}})
    assert failed.launch is None and failed.status["phase"] == "Failed"
    assert failed.status["reason"] == "BaseModelFailed"
    assert failed.status["message"] == ("baseModel.fromSweepJob: its base model, SweepJob lr-search, failed: "
                                        "none of 6 trials succeeded")
    assert failed.events == [("Warning", "BaseModelFailed", failed.status["message"])]


def test_waiting_for_a_sweep_has_the_base_models_deadline() -> None:
    finetune = from_sweep(baseModelWaitSeconds=600)
    running = {"status": {"phase": "Running", "trialsProgress": "1/6"}}
    timed_out = decide(finetune, base_job=running, created=NOW - timedelta(seconds=600))
    assert timed_out.status["phase"] == "Failed" and timed_out.status["reason"] == "BaseModelTimeout"
    assert timed_out.status["message"].endswith("gave up after baseModelWaitSeconds (600s)")
    assert "SweepJob lr-search" in timed_out.status["message"]


def test_deadline_fails_a_running_job() -> None:
    plan = decide(job(activeDeadlineSeconds=60), status={"phase": "Running", "startTime": "2026-11-23T11:58:00Z"},
                  observed_pods=pods(job()))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "DeadlineExceeded"
    assert plan.delete_pods == ["tiny-shakespeare-ptj-w0-a0"]


def test_finished_jobs_clean_pods_and_expire_after_their_ttl() -> None:
    done = {"phase": "Succeeded", "completionTime": "2026-11-23T11:59:00Z", "restarts": 0}
    finished = pods(job(), phases=["Succeeded"])
    assert decide(job(), status=done, observed_pods=finished).delete_pods == ["tiny-shakespeare-ptj-w0-a0"]
    assert decide(job(cleanPodPolicy="None"), status=done, observed_pods=finished).delete_pods == []
    assert decide(job(cleanPodPolicy="Running"), status=done, observed_pods=finished).delete_pods == []
    assert decide(job(ttlSecondsAfterFinished=120), status=done).delete_job is False
    assert decide(job(ttlSecondsAfterFinished=60), status=done).delete_job is True


def test_changing_resources_while_running_is_reported_not_half_applied() -> None:
    plan = decide(job(resources={"cpu": "4"}), status={"phase": "Running", "restarts": 0}, observed_pods=pods(job()))
    assert plan.launch is None and plan.delete_pods == []
    assert condition(plan, "SpecChangePending")["reason"] == "PodsOutdated"


def test_the_uid_names_the_default_checkpoint_location() -> None:
    from kubeforge.spec import checkpoint_uri

    assert checkpoint_uri(job(), SETTINGS.storage_root) == f"s3://models/kf/default/pretrainjob/tiny-shakespeare-{UID[:8]}"


def running(the_job: Any, **status: Any) -> dict[str, Any]:
    return {"phase": "Running", "restarts": 0, "startTime": "2026-11-23T11:00:00Z", **status}


def test_a_non_finite_loss_fails_the_job_and_never_reaches_status() -> None:
    diverged = Progress(step=120, total_steps=500, loss=float("nan"))
    plan = decide(job(), status=running(job()), observed_pods=pods(job()), progress=diverged)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "LossNotFinite"
    assert "loss=nan" in plan.status["message"] and plan.delete_pods == ["tiny-shakespeare-ptj-w0-a0"]
    json.dumps(plan.status, allow_nan=False)  # what a real API server accepts
    infinite_eval = Progress(step=120, total_steps=500, loss=2.0, eval_metrics={"perplexity": float("inf")})
    assert decide(job(), status=running(job()), observed_pods=pods(job()),
                  progress=infinite_eval).status["reason"] == "LossNotFinite"


def test_a_trainer_summary_with_a_nan_loss_fails_the_job() -> None:
    # What a diverged trainer writes: Python's json writes NaN, which is not JSON.
    message = ('{"step":300,"totalSteps":300,"resumedFromStep":0,"trainLoss":NaN,"finalEval":{},'
               f'"exportUri":"{CKPT}/export","checkpointUri":"{CKPT}"}}')
    plan = decide(job(), status=running(job()), observed_pods=pods(job(), phases=["Succeeded"], message=message))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "LossNotFinite"
    assert "trainLoss=nan" in plan.status["message"]
    json.dumps(plan.status, allow_nan=False)


def test_a_predecessors_pods_are_not_adopted_but_deleted() -> None:
    """A job deleted and created again under the same name: the old job's Succeeded pod (same name,
    same labels, another owner uid) is not this job's success."""
    old = pods(job(), phases=["Succeeded"], message="")
    old[0]["metadata"]["ownerReferences"][0]["uid"] = "0ld0ld00-0000-4000-8000-000000000000"
    plan = decide(job(), observed_pods=old)
    assert plan.status["phase"] == "Pending" and plan.launch is not None
    assert plan.delete_pods == ["tiny-shakespeare-ptj-w0-a0"]


def test_a_local_checkpoint_uri_is_refused_in_a_cluster() -> None:
    plan = reconcile(Observed(job=job(), status={}, pods=[], gpu_nodes=True, checkpoint_uri="/tmp/ckpt"), NOW)
    assert plan.launch is None
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "CheckpointNotDurable"
    assert "spec.checkpoint.uri '/tmp/ckpt'" in plan.status["message"]


def test_the_base_model_is_resolved_once_and_kept() -> None:
    finetune = job(example("finetune-lora-classify.yaml")[0])
    done = {"status": {"phase": "Succeeded", "exportUri": "s3://models/kf/base/export"}}
    started = decide(finetune, base_job=done)
    assert started.status["baseModelUri"] == "s3://models/kf/base/export"
    # The PretrainJob expired (its TTL) after the finetune started: nothing changes for the finetune.
    later = decide(finetune, status=started.status, observed_pods=pods(finetune, phases=["Failed"], exit_code=1))
    assert later.status["phase"] == "Restarting" and later.status["baseModelUri"] == "s3://models/kf/base/export"
    relaunched = decide(finetune, status=later.status, base_job=None)
    assert relaunched.launch is not None and relaunched.launch.base_model_uri == "s3://models/kf/base/export"


def test_waiting_for_a_base_model_has_a_deadline() -> None:
    finetune = job(example("finetune-lora-classify.yaml")[0], baseModelWaitSeconds=3600)
    created = NOW - timedelta(seconds=3599)
    assert decide(finetune, created=created).status["phase"] == "Pending"
    timed_out = decide(finetune, created=created, now=NOW + timedelta(seconds=1))
    assert timed_out.status["phase"] == "Failed" and timed_out.status["reason"] == "BaseModelTimeout"
    assert "baseModelWaitSeconds (3600s)" in timed_out.status["message"]


def test_an_evicted_worker_restarts_the_gang_without_using_a_retry() -> None:
    limited = job(backoffLimit=1)
    evicted = pods(limited, phases=["Failed"], exit_code=143, message="")
    evicted[0]["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                           "reason": "PreemptionByScheduler"}]
    plan = decide(limited, status=running(limited), observed_pods=evicted)
    assert plan.status["phase"] == "Restarting" and plan.status["reason"] == "Disrupted"
    assert plan.status["restarts"] == 1 and plan.status["disruptions"] == 1
    # A real failure after that still has its one retry.
    failed = pods(limited, attempt=1, phases=["Failed"], exit_code=1, message="boom")
    again = decide(limited, status=plan.status, observed_pods=failed)
    assert again.status["phase"] == "Restarting" and again.status["restarts"] == 2
    last = decide(limited, status=again.status,
                  observed_pods=pods(limited, attempt=2, phases=["Failed"], exit_code=1, message="boom"))
    assert last.status["phase"] == "Failed" and last.status["reason"] == "BackoffLimitExceeded"


def test_pods_get_a_grace_period_to_checkpoint_in() -> None:
    assert pods(job(terminationGracePeriodSeconds=300))[0]["spec"]["terminationGracePeriodSeconds"] == 300
    assert pods(job())[0]["spec"]["terminationGracePeriodSeconds"] == 120


def test_a_trainer_that_stops_stepping_is_restarted_as_stalled() -> None:
    stalling = job(stallTimeoutSeconds=600, backoffLimit=1, metrics={"port": 9090})
    first = decide(stalling, status=running(stalling), observed_pods=pods(stalling),
                   progress=Progress(step=40, total_steps=500))
    assert first.status["lastStepTime"] == "2026-11-23T12:00:00Z"
    stuck = Progress(step=40, total_steps=500)
    still = decide(stalling, status=first.status, observed_pods=pods(stalling), progress=stuck,
                   now=NOW + timedelta(seconds=599))
    assert still.status["phase"] == "Running" and still.delete_pods == []
    stalled = decide(stalling, status=first.status, observed_pods=pods(stalling), progress=stuck,
                     now=NOW + timedelta(seconds=600))
    assert stalled.status["phase"] == "Restarting" and stalled.status["reason"] == "Stalled"
    assert stalled.status["restarts"] == 1 and stalled.delete_pods == ["tiny-shakespeare-ptj-w0-a0"]
    assert "no new step since 2026-11-23T12:00:00Z" in stalled.status["message"]
    # Stalled restarts count against backoffLimit: the second stall fails the job.
    second = decide(stalling, status={**stalled.status, "lastStepTime": "2026-11-23T12:00:00Z"},
                    observed_pods=pods(stalling, attempt=1), progress=stuck, now=NOW + timedelta(seconds=1200))
    assert second.status["phase"] == "Failed" and second.status["reason"] == "Stalled"


def test_a_step_that_moves_keeps_a_job_from_stalling() -> None:
    stalling = job(stallTimeoutSeconds=600, metrics={"port": 9090})
    first = decide(stalling, status=running(stalling), observed_pods=pods(stalling),
                   progress=Progress(step=40, total_steps=500))
    moved = decide(stalling, status=first.status, observed_pods=pods(stalling),
                   progress=Progress(step=41, total_steps=500), now=NOW + timedelta(seconds=599))
    later = decide(stalling, status=moved.status, observed_pods=pods(stalling),
                   progress=Progress(step=41, total_steps=500), now=NOW + timedelta(seconds=900))
    assert later.status["phase"] == "Running"


def test_a_corpus_in_preparation_shows_in_status_and_is_no_stall_while_it_advances() -> None:
    stalling = job(stallTimeoutSeconds=600, metrics={"port": 9090})
    first = decide(stalling, status=running(stalling), observed_pods=pods(stalling),
                   progress=Progress(step=0, total_steps=0, preparing=True, tokens_prepared=1_000_000))
    assert (first.status["phase"], first.status["reason"], first.status["stepProgress"]) == (
        "Running", "PreparingCorpus", "preparing")
    assert first.status["corpusTokensPrepared"] == 1_000_000
    assert "1000000 tokens on rank 0 so far" in first.status["message"]
    # Hours of preparation, the count moving: no restart.
    status = first.status
    for minutes in range(9, 120, 9):
        status = decide(stalling, status=status, observed_pods=pods(stalling), now=NOW + timedelta(minutes=minutes),
                        progress=Progress(step=0, total_steps=0, preparing=True,
                                          tokens_prepared=1_000_000 * minutes)).status
        assert status["phase"] == "Running", status
    # A preparation that stops advancing is a stall like any other.
    stuck = decide(stalling, status=status, observed_pods=pods(stalling), now=NOW + timedelta(minutes=140),
                   progress=Progress(step=0, total_steps=0, preparing=True, tokens_prepared=117_000_000))
    assert (stuck.status["phase"], stuck.status["reason"]) == ("Restarting", "Stalled")


def test_without_progress_metrics_there_is_no_stall_to_see() -> None:
    silent = job(stallTimeoutSeconds=600, metrics={"port": 0})
    first = decide(silent, status=running(silent), observed_pods=pods(silent))
    later = decide(silent, status=first.status, observed_pods=pods(silent), now=NOW + timedelta(days=1))
    assert later.status["phase"] == "Running"


def distilling(**spec: Any) -> Any:
    """The classification example as a student distilled from FinetuneJob big-teacher, its base model a URI."""
    document = with_change(example("finetune-lora-classify.yaml")[0], "spec.lora", DELETE)
    return job(document, **{"method": "distill", "teacher": {"fromFinetuneJob": "big-teacher"},
                            "baseModel": {"uri": "s3://models/student-base"}, **spec})


def test_a_student_waits_for_its_teacher_finetune_job_and_starts_from_its_export() -> None:
    student = distilling()
    missing = decide(student)
    assert missing.launch is None and missing.status["phase"] == "Pending"
    assert condition(missing, "WaitingForTeacher")["reason"] == "TeacherMissing"
    assert "FinetuneJob big-teacher does not exist" in missing.status["message"]
    running = decide(student, status=missing.status,
                     teacher_job={"status": {"phase": "Running", "stepProgress": "40/300"}})
    assert running.launch is None and condition(running, "WaitingForTeacher")["reason"] == "TeacherNotReady"
    assert "waiting for FinetuneJob big-teacher to succeed (now Running, step 40/300)" in running.status["message"]
    done = {"status": {"phase": "Succeeded", "exportUri": "s3://models/kf/default/finetunejob/big-teacher/export"}}
    ready = decide(student, status=running.status, teacher_job=done)
    assert ready.launch is not None and ready.launch.teacher_uri == done["status"]["exportUri"]
    assert ready.status["teacherUri"] == done["status"]["exportUri"]
    assert condition(ready, "WaitingForTeacher")["status"] == "False"
    command = build_pods(student, 0, ready.launch, SETTINGS)[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--teacher-uri") + 1] == done["status"]["exportUri"]
    # Resolved once: the teacher may expire (its TTL) and the student's restarts still find it.
    relaunched = decide(student, status=ready.status, teacher_job=None)
    assert relaunched.launch is not None and relaunched.launch.teacher_uri == done["status"]["exportUri"]


def test_a_student_whose_teacher_failed_fails_naming_the_field() -> None:
    failed = decide(distilling(), teacher_job={"status": {"phase": "Failed", "message": "loss is nan"}})
    assert failed.launch is None and failed.status["phase"] == "Failed"
    assert failed.status["reason"] == "TeacherFailed" and condition(failed, "WaitingForTeacher")["status"] == "False"
    assert failed.status["message"] == ("teacher.fromFinetuneJob: its teacher, FinetuneJob big-teacher, failed: "
                                        "loss is nan")
    assert failed.events == [("Warning", "TeacherFailed", failed.status["message"])]


def test_waiting_for_a_teacher_has_the_base_models_deadline() -> None:
    student = distilling(baseModelWaitSeconds=600)
    timed_out = decide(student, created=NOW - timedelta(seconds=600),
                       teacher_job={"status": {"phase": "Running"}})
    assert timed_out.status["phase"] == "Failed" and timed_out.status["reason"] == "TeacherTimeout"
    assert "gave up after baseModelWaitSeconds (600s)" in timed_out.status["message"]


def test_a_teacher_given_by_uri_needs_no_wait_and_a_students_summary_names_it() -> None:
    student = distilling(teacher={"uri": "s3://models/teacher"})
    started = decide(student)
    assert started.launch is not None and started.launch.teacher_uri == "s3://models/teacher"
    summary = {"step": 30, "totalSteps": 30, "finalEval": {"accuracy": 0.8}, "exportUri": CKPT + "/export",
               "checkpointUri": CKPT, "resumedFromStep": 0, "teacherUri": "s3://models/teacher"}
    done = decide(student, status={**started.status, "phase": "Running"},
                  observed_pods=pods(student, phases=["Succeeded"], message=json.dumps(summary)))
    assert done.status["phase"] == "Succeeded" and done.status["teacherUri"] == "s3://models/teacher"
    assert done.status["evalMetrics"] == {"accuracy": 0.8}
