"""Checkpoints and exports: what they hold, how they commit, and how they are read back safely.

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

One module per concern:
- manifest: the commit protocol and the typed manifest (the only parser of one);
- safe_load: reading tensors and DCP metadata without running code;
- sharded: DCP save and load across any number of ranks;
- checkpointer: `Checkpointer`, which commits, finds, quarantines and retains checkpoints of files;
- state: what a checkpoint holds, each piece of training state saving and loading its own part;
- export: the final model in Hugging Face format.
"""

from kubeforge.trainer.checkpoint.checkpointer import (
    CHECKPOINTS,
    Checkpointer,
    CheckpointMismatch,
    Committed,
    Restored,
    UploadReport,
    check_model,
    job_identity,
    load_checkpoint,
    model_shape,
    step_prefix,
)
from kubeforge.trainer.checkpoint.export import export_model
from kubeforge.trainer.checkpoint.manifest import (
    MANIFEST,
    QUARANTINE,
    CorruptCheckpoint,
    JobIdentity,
    Manifest,
    fetch_verified,
    read_manifest,
    write_committed,
)
from kubeforge.trainer.checkpoint.safe_load import load_tensors
from kubeforge.trainer.checkpoint.sharded import SHARDS, load_sharded

__all__ = [
    "CHECKPOINTS", "MANIFEST", "QUARANTINE", "SHARDS", "CheckpointMismatch", "Checkpointer", "Committed",
    "CorruptCheckpoint", "JobIdentity", "Manifest", "Restored", "UploadReport", "check_model", "export_model",
    "fetch_verified", "job_identity", "load_checkpoint", "load_sharded", "load_tensors", "model_shape",
    "read_manifest", "step_prefix", "write_committed",
]
