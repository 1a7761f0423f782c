"""Every artifact, tag and file name, defined once."""

import urllib.parse

MODEL = "model"                       # the stage's final model (an MLflow model)
CHECKPOINT = "checkpoint.pt"          # the same weights as a weights_only checkpoint
SUMMARY_BEFORE = "summary_before.txt"  # torchinfo summary of the input model
SUMMARY_AFTER = "summary_after.txt"    # torchinfo summary of the output model
REPORT_TABLE = "report_table.csv"
REPORT_MARKDOWN = "report_table.md"
REPORT_DIR = "figures"                # artifact folder of a report run
MASK = "mask.pt"                      # lottery round: its mask, {weight name: bool tensor}
REWIND_WEIGHTS = "rewind_weights.pt"  # lottery round: the weights it was rewound to (masked), a checkpoint
ONNX_DIR = "onnx"                     # a final model's ONNX export, inside the logged model's artifacts
SOURCE_RUNS = "source_runs.json"      # report run: the runs its figures and table were drawn from
REPORT_JSON_TABLE = "report_table.json"  # report run: its table as an MLflow table (the UI shows it)


def round_model(k: int) -> str:
    """The pruned model after pruning round k."""
    return f"model_round_{k}"


# Tags
TAG_STUDY = "study"
TAG_STAGE = "stage"
TAG_TRIAL = "trial"
TAG_SEED = "seed"
TAG_MODEL_URI = "prunelab.model_uri"  # URI of the run's final model, for the next stage
TAG_SOURCE_RUNS = "prunelab.source_runs"  # report run: the ids of the runs it drew from, comma-separated
CHAMPION = "champion"                 # registry alias of a study's best trial
# Which process owns a run (tracking.owner.process_tags): `main` marks a RUNNING run whose process is gone
TAG_PID, TAG_HOST, TAG_PROCESS_START = "prunelab.pid", "prunelab.host", "prunelab.process_start"
# A step of `main` (prunelab.pipeline): what makes two runs of it the same, and how it ran
TAG_STEP_KEY, TAG_CODE_VERSION = "prunelab.step_key", "prunelab.code_version"
TAG_STEP_RUNNER = "prunelab.step_runner"  # in-process | process | kubernetes: how `main` ran the step
TAG_STUDY_LOCK = "prunelab.study_lock"  # experiment tag: the process running the study's `main` (tracking.lock)
TAG_FAILED_BECAUSE = "prunelab.failed_because"  # why prunelab ended a run FAILED that its own code did not end
# A run whose server went away mid-run (tracking.run.Run, tracking.sync)
TAG_SPOOLED_TO = "prunelab.spooled_to"    # the local folder holding what the server never got
TAG_SYNCED_FROM = "prunelab.synced_from"  # that folder, once `prunelab sync` has uploaded it
TAG_OUTAGE = "prunelab.outage"            # why the run was spooled
TAG_SYNCED_RUN = "prunelab.synced_from_run"  # the original run id, when sync had to create a new run


def is_uri(text: str) -> bool:
    """Whether a data folder setting names a URI (s3://…, gs://…, mlflow-artifacts:/…, runs:/…),
    which a step downloads where it runs, rather than a local folder."""
    return len(urllib.parse.urlparse(text).scheme) > 1  # one letter: a Windows drive
