"""`ptune <command>`: one subcommand per pipeline stage, plus helpers. Run it from the project root."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Only what builds the options is imported here: every command (its help too) pays for these, and a command's own
# modules (torch, transformers, dvc) are imported when that command runs (tests/test_layout.py checks it). A stage's
# code starts at stages/runner.py: this module only parses its command line (pipeline/code.py).
from .errors import PtuneError
from .paths import DEPLOY
from .pipeline.declared import NAMES, STAGES, SYNCED
from .serve import arguments as serve_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptune",
        description="P-tune a GLM-family chat model: one stage per command. The whole pipeline: "
        "`snakemake --cores 1 report` or `dvc repro`.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        sub.add_parser(stage.name, help=stage.help, description=stage.help)
    sub.add_parser("validate", help="check params.yaml against its schema and exit")
    pipeline = sub.add_parser(
        "pipeline",
        help="write dvc.yaml from the stages' declarations (`write`), or check it (`check`)",
        description="dvc.yaml is written from workflow/ptune/pipeline/declared.py: each stage's paths, params and the "
        "code it runs (its deps, from the import graph). `check` exits 1 when the file differs (CI runs it).",
    )
    action = pipeline.add_subparsers(dest="pipeline_command", metavar="write|check|code", required=True)
    action.add_parser("write", help="write dvc.yaml")
    action.add_parser("check", help="exit 1, with the difference, when dvc.yaml is not what `write` would write")
    code = action.add_parser("code", help="the files a stage runs (its code deps), or those no stage runs")
    code.add_argument("stage", nargs="?", choices=NAMES, help="a stage; none: the package's files no stage runs")
    preset = sub.add_parser(
        "preset",
        help="list presets, or copy one over params.yaml (`ptune preset use NAME`)",
        description="Presets are complete params files for real runs, in presets/.",
    )
    preset_sub = preset.add_subparsers(dest="preset_command", metavar="ACTION", required=True)
    preset_sub.add_parser("list", help="the presets and what each is for")
    use = preset_sub.add_parser("use", help="copy presets/NAME.yaml over params.yaml")
    use.add_argument("name")
    use.add_argument("--force", action="store_true", help="overwrite params.yaml even with uncommitted edits")
    doctor = sub.add_parser(
        "doctor",
        help="check disk, GPU, versions, git-lfs and the DVC remote against params.yaml",
        description="Check this machine against params.yaml: disk, GPU, versions, git-lfs, the model's and data's "
        "sources, the DVC remote (off the instance? reachable? its credentials; no key in a committed file) and "
        "when this instance's disk is wiped.",
    )
    doctor.add_argument(
        "--remote-roundtrip",
        action="store_true",
        help="also write, read back and delete a small object on the default remote, through DVC's own filesystem",
    )
    doctor.add_argument(
        "--large", action="store_true", help="the round trip with an object over 100 MiB too (a multipart upload)"
    )
    _add_state_commands(sub)
    _add_remote_commands(sub)
    pod = sub.add_parser(
        "pod-stage",
        help="run one stage as a job with no shared filesystem (the Kubernetes "
        "profile's rules): pull, repro, push to the DVC remote",
        description="What each job of `snakemake --profile profiles/kubernetes` runs: `dvc repro "
        "--pull STAGE` from the shared DVC remote, `dvc push --run-cache STAGE`, and "
        "the stage's dvc.lock entry written to RECORD.",
    )
    pod.add_argument("stage", choices=NAMES)
    pod.add_argument("record", help="where to write the stage's dvc.lock entry (the rule's output)")
    serve_arguments.add_parsers(sub)
    publish = sub.add_parser(
        "publish",
        help="upload the deploy bundle (prefix, model card, bundle.json) to a Hugging Face hub repository",
        description="Upload the deploy bundle to a Hugging Face model repository, created if missing: the prefix, "
        "the model card (README.md) and bundle.json; never the base model's weights. The token comes from HF_TOKEN "
        "or `hf auth login`, the hub from HF_ENDPOINT.",
    )
    publish.add_argument("--repo", required=True, metavar="ID", help="the repository, e.g. you/ptune-adgen")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.add_argument(
        "--bundle", default=str(DEPLOY), help="the bundle to upload (default: %(default)s, written by `ptune deploy`)"
    )
    publish.add_argument(
        "--dry-run", action="store_true", help="list the files that would be sent and check them; send nothing"
    )
    compare = sub.add_parser(
        "compare",
        help="compare DVC experiments: params, scores, training curves",
        description="Compare DVC experiments (`dvc exp run -S train.pre_seq_len=8`): a table "
        "here, and an HTML page with the table and a plot of training loss and "
        "scores.",
    )
    compare.add_argument(
        "experiments",
        nargs="*",
        metavar="EXP",
        help="experiment names or git revisions (`workspace` for the work tree); default: the "
        "current commit and all its experiments",
    )
    compare.add_argument(
        "-o",
        "--out",
        default="reports/compare.html",
        help="HTML page to write; the plot goes beside it as .png (default: %(default)s)",
    )
    seeds = sub.add_parser(
        "seeds",
        help="train with K seeds as DVC experiments, for the spread `ptune compare` shows",
        description="Queue one DVC experiment per training seed (`dvc exp run --queue -n seed-S -S train.seed=S`: "
        "params.yaml's train.seed and the next K-1) and run the queue (`dvc exp run --run-all`), each in its own "
        "workspace, every stage that does not read train.seed restored from the cache; then `ptune compare` "
        "shows the spread across seeds beside each run's interval. Run it from a commit (experiments start from one).",
    )
    seeds.add_argument("-k", type=int, default=3, help="how many seeds (default: %(default)s)")
    seeds.add_argument("--first", type=int, default=None, help="the first seed (default: params.yaml's train.seed)")
    seeds.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at a time (default: %(default)s)")
    seeds.add_argument("--queue-only", action="store_true", help="queue them; run later with `dvc exp run --run-all`")
    return parser


def _preset(args) -> None:
    from . import presets

    if args.preset_command == "list":
        for name, path in presets.available().items():
            print(f"{name:28} {presets.summary(path)}")
        return
    source = presets.use(args.name, force=args.force)
    print(
        f"params.yaml is now {source}; `dvc status` shows the stages that will rerun, "
        "`ptune doctor` checks this machine against it"
    )


def _pipeline(args, argv: list[str]) -> int:
    from .stages import runner

    runner.run_project_code(argv)  # the project's declarations and code, as its stages run them
    from .paths import REPO

    if REPO.resolve() != Path.cwd().resolve():
        raise PtuneError(f"{Path.cwd()}: not a ptune project (no workflow/ptune/ here); run from the project's root")
    from .pipeline import code, dvc_yaml

    if args.pipeline_command == "write":
        print(dvc_yaml.write())
    elif args.pipeline_command == "check":
        problem = dvc_yaml.check()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print("dvc.yaml: as the stages declare it")
    elif args.stage:
        print("\n".join(code.stage_files(args.stage)))
    else:
        print("\n".join(f"workflow/ptune/{rel}" for rel in code.not_stage_code()))
    return 0


def _doctor(args) -> int:
    from . import config, doctor

    findings = doctor.check(config.load(args.params), roundtrip=args.remote_roundtrip, large=args.large)
    print(doctor.render(findings))
    return 1 if any(not f.ok for f in findings) else 0


def _add_state_commands(sub) -> None:
    """Commands that keep a run alive across instances (docs/surviving.md)."""
    status = sub.add_parser("status", help="per stage: up to date here? on the DVC remote? and where that is")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    push = sub.add_parser("push", help="save everything to the DVC remote: outputs, run-cache, resume state")
    push.add_argument(
        "--stage", choices=NAMES, help="only this stage's outputs and the run-cache (what a job pushes as it ends)"
    )
    restore = sub.add_parser("restore", help="bring back everything from the DVC remote (on a fresh instance)")
    checkpoint = sub.add_parser("checkpoint", help="resume state (training checkpoints) to/from the DVC remote")
    direction = checkpoint.add_subparsers(dest="direction", metavar="push|pull", required=True)
    for name, helptext in (
        ("push", "upload .ptune/state/ (a running training's checkpoints)"),
        ("pull", "download it, so that the next run resumes instead of starting over"),
    ):
        d = direction.add_parser(name, help=helptext, description=helptext)
        d.add_argument(
            "--stage",
            action="append",
            choices=SYNCED,
            help="only this stage's state (repeatable; default: " + " and ".join(SYNCED) + ")",
        )
    for p in (status, push, restore, *direction.choices.values()):
        p.add_argument("-r", "--remote", help="a DVC remote other than the default one")


def _add_remote_commands(sub) -> None:
    """Setting up the DVC remote, and the credential helper that the OSS remote's AWS config names."""
    remote = sub.add_parser(
        "remote",
        help="make OSS (`ptune remote oss`) or a mounted NAS (`ptune remote nas`) the default DVC remote",
        description="Point the project's default DVC remote at storage that outlives the instance; writes "
        ".dvc/config (commit it), never a key.",
    )
    kind = remote.add_subparsers(dest="remote_command", metavar="oss|nas", required=True)
    oss = kind.add_parser(
        "oss",
        help="Alibaba OSS through its S3-compatible endpoint, with the committed .dvc/oss-aws-config",
        description="An OSS bucket as the default DVC remote: s3://BUCKET/PATH at https://oss-REGION.aliyuncs.com "
        "(-internal from an instance in the region), with the S3 settings OSS needs from .dvc/oss-aws-config. "
        "Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY if set, else the instance's RAM role.",
    )
    oss.add_argument("--bucket", required=True, help="the bucket's name, e.g. my-ptune-store")
    oss.add_argument("--region", required=True, help="its region ID, e.g. cn-hangzhou")
    oss.add_argument(
        "--internal",
        action="store_true",
        help="the internal endpoint (oss-REGION-internal): from an instance in the bucket's region, no traffic fee",
    )
    oss.add_argument("--path", default="ptune", help="the folder in the bucket (default: %(default)s)")
    oss.add_argument("--name", default="oss", help="the DVC remote's name (default: %(default)s)")
    oss.add_argument("--endpoint", help="another https:// endpoint instead of oss-REGION[-internal].aliyuncs.com")
    nas = kind.add_parser(
        "nas",
        help="a folder on a mounted NAS or OSS bucket (not on the instance's own disk)",
        description="A directory on a mounted NAS (or OSS) filesystem as the default DVC remote; refused on the "
        "workspace's or the system's disk, which go with the instance.",
    )
    nas.add_argument("path", help="absolute path on the mount, e.g. /mnt/data/ptune-dvc-storage")
    nas.add_argument("--name", default="nas", help="the DVC remote's name (default: %(default)s)")
    creds = sub.add_parser(
        "credentials",
        help="print temporary credentials for botocore's credential_process (.dvc/oss-aws-config runs it)",
        description="Print the instance RAM role's temporary credentials as the JSON botocore's credential_process "
        "reads (stdout only; nothing is written). From $ALIBABA_CLOUD_CREDENTIALS_URI if set, else the instance "
        "metadata service ($PTUNE_METADATA_URL, default http://100.100.100.200).",
    )
    source = creds.add_subparsers(dest="credentials_source", metavar="ram-role", required=True)
    source.add_parser("ram-role", help="the instance's RAM role, from its metadata service")


def _run_remote_command(args) -> None:
    from .remote import configure

    if args.remote_command == "oss":
        target = configure.oss_remote(args.bucket, args.region, args.path, args.name, args.internal, args.endpoint)
        print(configure.setup_oss(target))
    else:
        print(configure.setup_nas(args.path, args.name))


def _run_state_command(args) -> None:
    if args.command == "status":
        from .remote import status

        status.run(as_json=args.json, remote=args.remote)
    elif args.command == "push":
        from .remote import sync

        sync.push(remote=args.remote, stage=args.stage)
    elif args.command == "restore":
        from .remote import sync

        sync.restore(remote=args.remote)
    else:
        from .remote import checkpoints

        if args.direction == "push":
            done = checkpoints.push(args.stage, remote=args.remote)
            if not done:
                print("ptune: no resume state in .ptune/state/ to push (nothing is running or was killed)")
        elif not checkpoints.pull(args.stage, remote=args.remote):
            print("ptune: the remote holds no resume state (no training was pushed while it ran)")
    # status prints it itself, after its table; a job's push (push --stage) leaves it to the end of the run
    a_jobs_push = args.command == "push" and args.stage is not None
    if args.command != "status" and not a_jobs_push:
        from .remote.dvc_remote import check_survival

        warning = check_survival()
        if warning:
            print(warning, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "chat"):
        from .serve import commands as serve_commands

        return serve_commands.main(argv)  # the same arguments, parsed there again (`python -m ptune.serve`)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers' advisory warnings (e.g. about generation flags) are noise in stage logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .state.stopping import Stopped  # what every command may raise on a stop request

    try:
        if args.command in NAMES:
            from .stages import runner

            runner.run(args.command, args.params, argv)
        elif args.command == "pipeline":
            return _pipeline(args, argv)
        elif args.command == "validate":
            from . import config

            config.load(args.params)
            print(f"{args.params}: valid")
        elif args.command == "preset":
            _preset(args)
        elif args.command == "doctor":
            return _doctor(args)
        elif args.command == "publish":
            from .bundle import publish

            print(publish.run(Path(args.bundle), args.repo, private=args.private, dry_run=args.dry_run))
        elif args.command == "pod-stage":
            from .remote import pods

            pods.run(args.stage, Path(args.record))
        elif args.command == "credentials":
            from .remote import credentials

            credentials.run()
        elif args.command == "remote":
            _run_remote_command(args)
        elif args.command == "compare":
            from .reporting import compare

            print(compare.run(args.experiments, Path(args.out)))
            print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
        elif args.command == "seeds":
            from .reporting import compare

            names = compare.seeds(args.k, args.first, run=not args.queue_only, jobs=args.jobs)
            print(f"experiments {', '.join(names)}; `ptune compare` shows them and their spread")
        else:
            _run_state_command(args)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:  # on request (SIGTERM, SIGINT, SIGHUP): not an error, not a success either
        print(f"ptune: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
