"""`kubeforge`: run jobs with no cluster, train inside a pod, validate manifests.

Exit codes (the operator reads them): 0 done; 2 the job can never succeed as written (bad spec, bad
data), so do not retry; 143 stopped on SIGTERM with its step's checkpoint committed (a rerun loses no
step); anything else may succeed on a retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubeforge.basemodel import (
    BaseJob,
    Resolved,
    ResolvedTeacher,
    UpstreamStatus,
    WaitingForBaseJob,
    resolve_base_model,
    resolve_teacher,
    upstream_base_job,
    upstream_teacher_job,
)
from kubeforge.spec import (
    Job,
    JobError,
    SpecError,
    SweepJob,
    base_model_cache_uri,
    checkpoint_uri,
    corpus_cache_uri,
    export_uri,
    job_storage_uri,
    load_job_file,
    load_jobs,
    load_manifest_file,
    parse_job,
    trial_manifest,
)
from kubeforge.status import (
    EXIT_PERMANENT,
    EXIT_PREEMPTED,
    SUCCEEDED,
    EvalObserver,
    JobStatus,
    Preempted,
    SweepStatus,
    TrainerError,
    TrainerResult,
    TrainerSummary,
    termination_message,
)
from kubeforge.storage import StorageError

DEFAULT_RUN_ROOT = "kubeforge-runs"
log = logging.getLogger("kubeforge")


def _setup_logging(verbose: bool, level: str = "info") -> None:
    rank = os.environ.get("RANK")
    where = f" rank{rank}" if rank is not None else ""
    logging.basicConfig(level=logging.DEBUG if verbose else getattr(logging, level.upper()),
                        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
    # Library chatter (HTTP requests, weight-loading reports) would drown the training log.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def base_model_uri(job: Job, jobs: list[Job], root: str) -> str | None:
    """The base model URI of a finetune job, None for a pretrain job. With no cluster, the job it
    names ran before it in this file (`_order`), or ran before under the same root: a PretrainJob has
    finished, a SweepJob's status (kubeforge/localsweep.py) says whether it succeeded."""
    def finished(base_job: BaseJob) -> UpstreamStatus:
        if base_job.kind == "SweepJob":
            from kubeforge.localsweep import read_status

            return read_status(root, job.namespace, base_job.name)
        upstream = next((other for other in jobs if other.kind == "PretrainJob" and other.name == base_job.name
                         and other.namespace == job.namespace), None)
        storage = checkpoint_uri(upstream, root) if upstream else job_storage_uri(root, "PretrainJob",
                                                                                  job.namespace, base_job.name)
        return JobStatus(phase=SUCCEEDED, export_uri=export_uri(storage))

    resolution = resolve_base_model(job, finished)
    if isinstance(resolution, WaitingForBaseJob):
        # Nothing else runs meanwhile with no cluster: waiting would be for ever.
        status = resolution.status
        found = (f"ended {status.phase}: {status.message or status.reason}" if status and status.phase
                 else f"has not run under {root}")
        raise JobError(f"baseModel.from{resolution.job.kind}: {resolution.job.kind} {resolution.job.name} {found}; "
                       "it must succeed first (in the same file, or an earlier run with the same --output)")
    if isinstance(resolution, Resolved) and resolution.source:
        print(f"    base model: {resolution.uri}, the export of {resolution.source}", file=sys.stderr)
    return resolution.uri if isinstance(resolution, Resolved) else None


def teacher_uri(job: Job, jobs: list[Job], root: str) -> str | None:
    """A distilling job's teacher URI, None for any other job. With no cluster, a FinetuneJob it names
    has finished: it ran before it in this file (`_order`), or ran before under the same root."""
    def finished(name: str) -> JobStatus:
        upstream = next((other for other in jobs if other.kind == "FinetuneJob" and other.name == name
                         and other.namespace == job.namespace), None)
        storage = checkpoint_uri(upstream, root) if upstream else job_storage_uri(root, "FinetuneJob",
                                                                                  job.namespace, name)
        return JobStatus(phase=SUCCEEDED, export_uri=export_uri(storage))

    resolution = resolve_teacher(job, finished)
    return resolution.uri if isinstance(resolution, ResolvedTeacher) else None


def _upstreams(manifest: Job | SweepJob) -> list[tuple[str, str]]:
    """(kind, name) of each job or sweep whose export the job, or a sweep's trials, start from."""
    if isinstance(manifest, SweepJob):
        spec = manifest.spec
        first = {p.path: p.candidates()[0] for p in spec.parameters}  # any trial names the same upstreams
        job = parse_job(trial_manifest(spec.template, manifest.trial_name(0), manifest.namespace, first))
    else:
        job = manifest
    base, teacher = upstream_base_job(job), upstream_teacher_job(job)
    return ([(base.kind, base.name)] if base else []) + ([("FinetuneJob", teacher)] if teacher else [])


def _order(manifests: list[Job | SweepJob]) -> list[Job | SweepJob]:
    """Each job and sweep after those of the file it starts from: its base model's PretrainJob or
    SweepJob, its teacher's FinetuneJob. Otherwise in the file's order."""
    present = {(m.kind, m.namespace, m.name): m for m in manifests}

    def depth(manifest: Job | SweepJob, hops: int = 0) -> int:
        above = [present[key] for kind, name in _upstreams(manifest)
                 if (key := (kind, manifest.namespace, name)) in present]
        if not above or hops >= len(manifests):  # a cycle stops here
            return 0
        return 1 + max(depth(upstream, hops + 1) for upstream in above)

    return sorted(manifests, key=depth)


def cmd_run(args: argparse.Namespace) -> int:
    from kubeforge.trainer.loop import train

    manifests = load_manifest_file(args.file)
    jobs = [m for m in manifests if not isinstance(m, SweepJob)]
    results: list[TrainerResult | SweepStatus] = []
    for manifest in _order(manifests):
        if isinstance(manifest, SweepJob):
            results.append(_run_sweep(manifest, jobs, args))
            continue
        job = manifest
        root = checkpoint_uri(job, args.output)
        print(f"==> {job.kind} {job.namespace}/{job.name}: checkpoints in {root}", file=sys.stderr)
        base = base_model_uri(job, jobs, args.output)
        result = train(job, checkpoint_root=root, base_model_uri=base, progress=not args.no_progress,
                       base_model_cache=base_model_cache_uri(args.output, job.namespace),
                       corpus_cache=corpus_cache_uri(args.output, job.namespace),
                       teacher_uri=teacher_uri(job, jobs, args.output))
        results.append(result)
        evals = ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items())
        print(f"==> {job.kind} {job.name} done at step {result.step}: {evals}", file=sys.stderr)
        print(f"    model: {result.export_uri}", file=sys.stderr)
        if result.compression is not None:
            print(f"    {result.compression.summary}: {result.compression.quantized.uri}", file=sys.stderr)
        if result.pruning is not None:
            print(f"    {result.pruning.summary}: {result.pruning.pruned.uri}", file=sys.stderr)
    if args.json:
        print(json.dumps([result.to_json() for result in results], indent=2))
    return 0 if all(r.phase == SUCCEEDED for r in results if isinstance(r, SweepStatus)) else 1


def _run_sweep(sweep: SweepJob, jobs: list[Job], args: argparse.Namespace) -> SweepStatus:
    """A SweepJob's trials one after another, after the file's jobs they start from (`_order`)."""
    from kubeforge.localsweep import run_sweep
    from kubeforge.trainer.loop import train

    def train_trial(job: Job, on_eval: EvalObserver) -> TrainerResult:
        return train(job, checkpoint_root=checkpoint_uri(job, args.output), progress=False, on_eval=on_eval,
                     base_model_uri=base_model_uri(job, jobs, args.output),
                     base_model_cache=base_model_cache_uri(args.output, job.namespace),
                     corpus_cache=corpus_cache_uri(args.output, job.namespace),
                     teacher_uri=teacher_uri(job, jobs, args.output))

    status = run_sweep(sweep, args.output, train_trial)
    best = status.best_trial
    print(f"==> SweepJob {sweep.name} {status.phase}: {status.message}", file=sys.stderr)
    if best is not None:
        print(f"    best trial {best.name}: {sweep.spec.objective.metric} {best.value:.4f}, "
              + ", ".join(f"{k}={v}" for k, v in best.parameters.items()), file=sys.stderr)
        print(f"    model: {best.export_uri}", file=sys.stderr)
    return status


def _read_train_spec(args: argparse.Namespace) -> Job:
    if args.spec_env:
        if args.spec_env not in os.environ:
            raise SpecError([f"--spec-env: the environment has no {args.spec_env}"])
        jobs = load_jobs(os.environ[args.spec_env])
    elif args.spec == "-":
        jobs = load_jobs(sys.stdin.read())
    else:
        jobs = load_job_file(args.spec)
    if len(jobs) != 1:
        raise SpecError([f"--spec: expected one job, found {len(jobs)}"])
    return jobs[0]


def cmd_train(args: argparse.Namespace) -> int:
    """What a pod runs: one job, its URIs given by the operator (or defaulted as `run` does)."""
    if args.processes > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_processes(args)
    from kubeforge.trainer.loop import train

    job = _read_train_spec(args)
    root = args.checkpoint_uri or checkpoint_uri(job, DEFAULT_RUN_ROOT)
    base = args.base_model_uri or base_model_uri(job, [job], DEFAULT_RUN_ROOT)
    result = train(job, checkpoint_root=root, base_model_uri=base, progress=False,
                   base_model_cache=args.base_model_cache, corpus_cache=args.corpus_cache,
                   teacher_uri=args.teacher_uri or teacher_uri(job, [job], DEFAULT_RUN_ROOT))
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 speaks for the job
    if args.result:
        with open(args.result, "w", encoding="utf-8") as handle:
            json.dump(result.to_json(), handle, indent=2)
    if args.termination_log:
        # Kubernetes keeps at most 4 KiB of it in the pod's status: the operator reads the outcome there.
        _write_termination_log(args.termination_log, result.summary())
    return 0


def _launch_processes(args: argparse.Namespace) -> int:
    """`train --processes N`: this same command once per local rank, supervised (a pod with N GPUs)."""
    from kubeforge.trainer.launcher import launch

    if args.spec == "-":
        raise SpecError(["--spec: standard input cannot feed several processes; use a file or --spec-env"])
    command = [sys.executable, "-m", "kubeforge", "--log-level", "debug" if args.verbose else args.log_level, "train"]
    command += ["--spec-env", args.spec_env] if args.spec_env else ["--spec", args.spec]
    for flag, value in (("--checkpoint-uri", args.checkpoint_uri), ("--base-model-uri", args.base_model_uri),
                        ("--base-model-cache", args.base_model_cache), ("--corpus-cache", args.corpus_cache),
                        ("--teacher-uri", args.teacher_uri),
                        ("--result", args.result)):
        if value:
            command += [flag, value]
    if not args.termination_log:
        return launch(args.processes, lambda _: command).code
    # Each process its own termination log: the processes a failure stops write their own (SIGTERM)
    # outcome, which must not overwrite the cause that the pod's status should report.
    with tempfile.TemporaryDirectory(prefix="kubeforge-termination-") as logs:
        ended = launch(args.processes, lambda rank: [*command, "--termination-log", f"{logs}/{rank}"])
        decided = Path(logs, str(ended.local_rank or 0))
        if decided.exists():
            shutil.copyfile(decided, args.termination_log)
        elif ended.code:  # killed before it could say why (SIGKILL, the OOM killer)
            _write_termination_log(args.termination_log, TrainerError(
                error=f"local rank {ended.local_rank} exited with code {ended.code} and left no message",
                permanent=False))
    return ended.code


def _write_termination_log(path: str, outcome: TrainerSummary | TrainerError) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(termination_message(outcome)[:4000])
    except OSError as exc:
        log.warning("cannot write the termination log %s: %s", path, exc)


def cmd_validate(args: argparse.Namespace) -> int:
    for job in load_manifest_file(args.file):
        print(f"{job.kind} {job.namespace}/{job.name}: valid")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from kubeforge.crds import write, write_reference

    for path in write(Path(args.output)):
        print(f"wrote {path}")
    if args.reference:
        print(f"wrote {write_reference(Path(args.reference))}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """Print what the operator would create for each job, as `helm template` does for a chart."""
    import yaml

    from kubeforge.operator import builders
    from kubeforge.operator.contract import LaunchPlan
    from kubeforge.operator.settings import OperatorSettings

    jobs = load_job_file(args.file)
    flags = {variable: getattr(args, name) for name, variable in RENDER_SETTINGS.items()
             if getattr(args, name) is not None}
    try:
        settings = OperatorSettings.from_env({**os.environ, **flags})
    except ValueError as exc:
        raise SpecError([f"operator settings: {exc}"]) from None
    documents: list[dict[str, Any]] = []
    for job in jobs:
        root = checkpoint_uri(job, settings.storage_root)
        base = base_model_uri(job, jobs, settings.storage_root)
        plan = LaunchPlan(root, base, cpu_fallback=args.cpu_fallback,
                          base_model_cache=base_model_cache_uri(settings.storage_root, job.namespace),
                          corpus_cache=corpus_cache_uri(settings.storage_root, job.namespace),
                          teacher_uri=teacher_uri(job, jobs, settings.storage_root))
        group = builders.build_pod_group(job, settings)
        documents += [builders.build_service(job), *([group] if group else []),
                      *builders.build_pods(job, args.attempt, plan, settings)]
    sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False, width=120))
    return 0


#: `render` flags that override an operator setting, with the environment variable each overrides.
RENDER_SETTINGS = {
    "trainer_image": "KUBEFORGE_TRAINER_IMAGE",
    "trainer_cpu_image": "KUBEFORGE_TRAINER_CPU_IMAGE",
    "storage_root": "KUBEFORGE_STORAGE_ROOT",
    "s3_endpoint": "KUBEFORGE_S3_ENDPOINT",
    "s3_credentials_secret": "KUBEFORGE_S3_CREDENTIALS_SECRET",
    "pod_defaults": "KUBEFORGE_POD_DEFAULTS",
    "gang_defaults": "KUBEFORGE_GANG_DEFAULTS",
    "coscheduling_scheduler": "KUBEFORGE_COSCHEDULING_SCHEDULER",
}


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the Kopf operator with settings from the environment (the Helm chart sets them)."""
    import kopf
    from kubernetes import config
    from prometheus_client import start_http_server

    from kubeforge.operator.handlers import api_client, create_registry
    from kubeforge.operator.metrics import OperatorMetrics
    from kubeforge.operator.peering import missing_peerings
    from kubeforge.operator.settings import OperatorSettings

    settings = OperatorSettings.from_env()
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    standalone = args.standalone
    missing = [] if standalone else missing_peerings(api_client(), PEERING_NAME, settings.namespaces)
    if missing:
        # Kopf would wait for them forever, doing nothing: one operator without peering is what
        # `kubectl apply -f crds/` alone can run.
        log.warning("no peering object %s (the Helm chart creates them): running standalone, as with "
                    "--standalone. Run one replica only, or install the chart to run several.", ", ".join(missing))
        standalone = True
    metrics = OperatorMetrics()
    start_http_server(settings.metrics_port, registry=metrics.registry)
    registry = create_registry(settings, api_client(), metrics)
    kopf.run(registry=registry, clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
             standalone=standalone, peering_name=None if standalone else PEERING_NAME,
             priority=args.peering_priority, liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz")
    return 0


PEERING_NAME = "kubeforge"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def peering_priority(text: str) -> int:
    """An integer, or `random`: Kopf pauses every replica when two share the highest priority, so the
    replicas of one Deployment each draw their own and the others stand by until the highest goes."""
    if text == "random":
        return random.SystemRandom().randint(1, 2**31 - 1)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'random', got {text!r}") from None


def _add_train_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`kubeforge train`: what the operator's pods run, its URIs given by the operator."""
    train = commands.add_parser("train", help="train one job (what the operator's pods run)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="the job manifest, or - for standard input")
    source.add_argument("--spec-env", help="the name of an environment variable holding the manifest")
    train.add_argument("--checkpoint-uri", help="overrides the job's checkpoint location")
    train.add_argument("--base-model-uri", help="the resolved base model of a FinetuneJob")
    train.add_argument("--base-model-cache",
                       help="where hf:// base models are kept once fetched (default: next to the checkpoints)")
    train.add_argument("--corpus-cache",
                       help="where a PretrainJob's corpus is kept prepared (default: next to the checkpoints)")
    train.add_argument("--teacher-uri", help="the resolved teacher of a FinetuneJob with method distill")
    train.add_argument("--result", help="write the result JSON here")
    train.add_argument("--termination-log", help="write a short JSON summary (or the error) here on exit")
    train.add_argument("--processes", type=_positive, default=1,
                       help="trainer processes in this pod, one per GPU: ranks NODE_RANK * N + local rank "
                            "of WORLD_SIZE (default: 1, this process)")
    train.set_defaults(handler=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeforge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (as --log-level debug)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job, a pipeline of jobs or a sweep on this machine, no cluster")
    run.add_argument("file", help="a manifest; of several documents, each runs after the jobs and sweeps it "
                                     "starts from")
    run.add_argument("--output", default=DEFAULT_RUN_ROOT,
                     help="storage root for jobs without checkpoint.uri (a directory or s3://bucket/prefix)")
    run.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    run.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    run.set_defaults(handler=cmd_run)

    _add_train_command(commands)

    validate = commands.add_parser("validate", help="check manifests against the job spec")
    validate.add_argument("file")
    validate.set_defaults(handler=cmd_validate)

    operator = commands.add_parser("operator", help="run the operator (watches PretrainJobs and FinetuneJobs)")
    operator.add_argument("--standalone", action="store_true",
                          help="no peering with other replicas (only with a single replica)")
    operator.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port")
    operator.add_argument("--peering-priority", type=peering_priority, default=0,
                          help="Kopf peering priority: the highest live one works, the others stand by; "
                               "'random' for replicas of one Deployment (default: 0)")
    operator.set_defaults(handler=cmd_operator)

    render = commands.add_parser(
        "render", help="print the Service, PodGroup and pods the operator would create for a job",
        description="Settings come from the operator's environment variables (as the chart sets them); "
                    "each flag overrides one.")
    render.add_argument("file", help="a job manifest (several documents: every job)")
    for name, variable in RENDER_SETTINGS.items():
        render.add_argument("--" + name.replace("_", "-"), help=f"overrides {variable}"
                            + (" (JSON)" if name.endswith("_defaults") else ""))
    render.add_argument("--cpu-fallback", action="store_true",
                        help="render the CPU fallback pods (what a cluster without GPUs gets)")
    render.add_argument("--attempt", type=int, default=0, help="the gang attempt (restarts so far; default 0)")
    render.set_defaults(handler=cmd_render)

    crds = commands.add_parser("crds", help="write the CRDs generated from the job spec")
    crds.add_argument("--output", default="crds", help="directory (default: crds)")
    crds.add_argument("--reference", default="docs/crd-reference.md",
                      help="also write the field reference here (default: docs/crd-reference.md; '' for none)")
    crds.set_defaults(handler=cmd_crds)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_level)
    code = _dispatch(args)
    if args.handler is cmd_train and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a gloo world could abort (SIGABRT, exit 134) in the interpreter's finalization after
        # its outcome was written, gloo's threads still holding work (pytorch/pytorch#179291; seen in CI
        # once in a few runs). The process group is destroyed and the outcome written: leave without
        # finalizing, with the exit code the outcome has.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> Any:
    code, message = 0, ""
    try:
        code = args.handler(args)
    except JobError as exc:
        code, message = EXIT_PERMANENT, str(exc)
    except Preempted as exc:
        code, message = EXIT_PREEMPTED, str(exc)
    except StorageError as exc:
        code, message = 1, str(exc)
    except Exception as exc:
        # Anything unforeseen may be transient: retryable, with its cause stated and the trace logged.
        log.exception("unexpected failure")
        code, message = 1, f"{type(exc).__name__}: {exc}"
    if message:
        print(f"error: {message}", file=sys.stderr)
        if getattr(args, "termination_log", None):
            _write_termination_log(args.termination_log, TrainerError(error=message, permanent=code == EXIT_PERMANENT))
    return code
