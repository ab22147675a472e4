# Snakemake front end of the pipeline. It declares nothing of its own: one rule per stage of dvc.yaml, built
# from that file, so the two front ends cannot drift. Each rule asks DVC to bring its stage up to date
# (`dvc repro --single-item --pull`), which makes DVC's cache the only cache: a stage whose deps and params are
# unchanged is restored from the cache (or the remote), never recomputed.
#
#   snakemake --cores 1 report     # the whole pipeline (the `report` rule needs every other stage)
#   snakemake --cores 1 train      # up to one stage
#
# Convention read from dvc.yaml: an output path without a file suffix (models/base, data/raw) is a directory.

import sys
import yaml
from pathlib import Path
from snakemake.utils import validate

from ptune import config as ptune_config

# ptune's own loader first: a YAML syntax error is named by file, line and column and a bad key by its dotted
# name, the same messages `ptune` and `dvc repro` give (Snakemake's configfile parser names neither).
ptune_config.load("params.yaml")
from ptune.remote.dvc_remote import check_survival, push_each_stage
from ptune.remote import pods
from ptune.state import stopping

configfile: "params.yaml"
report: "workflow/report/workflow.rst"
validate(config, "workflow/schemas/params.schema.yaml")

DVC_STAGES = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _paths(entries):
    """Paths of a dvc.yaml deps/outs/metrics/plots list, whose items are strings or {path: options}."""
    for entry in entries or []:
        yield from ([entry] if isinstance(entry, str) else entry)


def _written(stage):
    """Every path a dvc.yaml stage writes: its outs, metrics and plots."""
    return [path for kind in ("outs", "metrics", "plots") for path in _paths(stage.get(kind))]


def _outputs(stage):
    in_report = stage.get("meta", {}).get("report", {})
    for path in _written(stage):
        # Plain outputs, which Snakemake removes before a job runs: `dvc repro` then restores an unchanged stage
        # from DVC's cache or run-cache (links, no copy) or reruns it. update() would keep them, but after a
        # failed job it copies the old outputs back and records the job as done with the new params, so the
        # next run skipped a stage that DVC still saw as changed (and it copied every directory output, a
        # 13 GB model included, as a backup before each job).
        output = path if Path(path).suffix else directory(path)
        # report(): Snakemake's own report (`snakemake --report FILE`) includes the outputs that dvc.yaml
        # lists under the stage's meta.report, with the options given there (category, labels, ...).
        yield report(output, **in_report[path]) if path in in_report else output


def _upstream(name, seen=None):
    """Every stage whose outputs `name` needs, transitively."""
    seen = set() if seen is None else seen
    deps = set(_paths(DVC_STAGES[name].get("deps")))
    for other, stage in DVC_STAGES.items():
        if other not in seen and set(_written(stage)) & deps:
            seen.add(other)
            _upstream(other, seen)
    return seen


# `snakemake report` must bring every stage up to date, or `dvc status` would show the ones it skipped.
_missing = set(DVC_STAGES) - {"report"} - _upstream("report")
if _missing:
    raise WorkflowError(f"dvc.yaml: the report stage does not depend on {sorted(_missing)}; add their outputs "
                        "to its deps so that `snakemake report` covers the whole pipeline")


def _producers(name):
    """The stages whose outputs `name` reads directly."""
    deps = set(_paths(DVC_STAGES[name].get("deps")))
    return [other for other, stage in DVC_STAGES.items() if deps & set(_written(stage))]


# PTUNE_PUSH_EACH_STAGE=1: each rule also pushes its stage's outputs (and the run-cache) to the DVC remote as soon
# as the stage is done, so that an instance stopped mid-run loses at most the stage that was running. Off by
# default. An environment variable, not a param: params are part of the stages' hashes.
_PUSH = " && ptune push --stage {params.stage}" if push_each_stage() else ""

# Jobs with no shared filesystem (Kubernetes): Snakemake would move each rule's files through its default storage,
# but a stage's data lives in DVC, and the DVC remote is the storage the jobs share (ptune/remote/pods.py). So the rules
# declare only a small record per stage, keyed by dvc.yaml + params.yaml, and each job runs `ptune pod-stage`:
# `dvc repro --pull` from the remote, `dvc push --run-cache`, and the stage's dvc.lock entry into the record.
_NO_SHARED_FS = workflow.storage_settings.default_storage_provider is not None
_KEY = pods.run_key() if _NO_SHARED_FS else None

for _name, _stage in DVC_STAGES.items():
    if _NO_SHARED_FS:
        rule:
            name: _name
            input: [pods.record_path(_KEY, up) for up in _producers(_name)]
            output: pods.record_path(_KEY, _name)
            params: stage=_name
            resources: **_stage.get("meta", {}).get("resources", {})
            shell: "ptune pod-stage {params.stage} {output}"
        continue
    rule:
        name: _name
        # params.yaml is an input of every rule: on a fresh clone Snakemake has no record of params, and a
        # stage that DVC finds unchanged is a no-op, restored from the cache.
        input: list(_paths(_stage.get("deps"))) + ["params.yaml", "dvc.yaml"]
        output: list(_outputs(_stage))
        params: stage=_name  # bound now: a loop variable in `shell` would run the last stage for every rule
        resources: **_stage.get("meta", {}).get("resources", {})
        shell: "dvc --wait-for-lock repro --single-item --pull {params.stage} && touch {output}" + _PUSH


# SIGTERM, SIGINT and SIGHUP reach the running stages: left to itself, Snakemake answers SIGTERM by waiting for the
# running jobs to end (a training: hours), and dies of SIGHUP leaving them running. Passed on, train and evaluate
# save their progress and stop at once, and Snakemake exits when they have (ptune/state/stopping.py).
onstart:
    stopping.forward_to_stages()


# The end of every run says, loudly, when nothing it made would survive the instance (a remote on the same disk).
def _warn_if_remote_dies_with_instance():
    warning = check_survival()
    if warning:
        print(warning, file=sys.stderr)


onsuccess:
    _warn_if_remote_dies_with_instance()

onerror:
    _warn_if_remote_dies_with_instance()
