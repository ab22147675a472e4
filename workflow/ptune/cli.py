"""`ptune <command>`: one subcommand per pipeline stage, plus helpers. Run it from the project root."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import PtuneError

# The pipeline's stages in DAG order; each is the module of the same name, with `run(params)`.
STAGES = ("fetch_weights", "fetch_data", "preprocess", "train", "evaluate", "deploy", "report")
STAGE_HELP = {
    "fetch_weights": "put the base model and tokenizer in models/base/",
    "fetch_data": "write ADGEN-shaped data/raw/train.json and dev.json",
    "preprocess": "apply the prompt template, tokenize and truncate into data/processed/",
    "train": "learn the P-tuning v2 prefix into models/ptuning/",
    "evaluate": "generate for the dev set, score BLEU-4 / ROUGE into reports/metrics.json",
    "deploy": "write the serving bundle to models/deploy/ and smoke-test it",
    "report": "write reports/report.html and report.md: scores, training, examples, cost, deploy, provenance",
}


def run_stage(stage: str, params_path: str) -> None:
    from . import config, determinism, faults, locks, stagelog

    params = config.load(params_path)  # bad params fail before anything is recorded or locked
    faults.arm(stage)
    with locks.stage_lock(stage):
        stagelog.record_start(stage)
        determinism.configure_threads()
        module = importlib.import_module(f"ptune.{stage}")
        if stage == "report":
            module.run(params)  # it writes reports/timings.json, its own timing included
            return
        with stagelog.timed(stage) as facts:
            facts.update(module.run(params) or {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptune",
        description="P-tune a GLM-family chat model: one stage per command. The whole pipeline: "
                    "`snakemake --cores 1 report` or `dvc repro`.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage])
    sub.add_parser("validate", help="check params.yaml against its schema and exit")
    compare = sub.add_parser("compare", help="compare DVC experiments: params, scores, training curves",
                             description="Compare DVC experiments (`dvc exp run -S train.pre_seq_len=8`): a table "
                                         "here, and an HTML page with the table and a plot of training loss and "
                                         "scores.")
    compare.add_argument("experiments", nargs="*", metavar="EXP",
                         help="experiment names or git revisions (`workspace` for the work tree); default: the "
                              "current commit and all its experiments")
    compare.add_argument("-o", "--out", default="reports/compare.html",
                         help="HTML page to write; the plot goes beside it as .png (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # transformers' advisory warnings (e.g. about generation flags) are noise in stage logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command in STAGES:
            run_stage(args.command, args.params)
        elif args.command == "validate":
            from . import config

            config.load(args.params)
            print(f"{args.params}: valid")
        elif args.command == "compare":
            from pathlib import Path

            from . import compare

            print(compare.run(args.experiments, Path(args.out)))
            print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
