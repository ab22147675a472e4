"""`ptune <command>`: one subcommand per pipeline stage, plus helpers. Run it from the project root."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from . import backends, legacy_env
from .errors import PtuneError

# The pipeline's stages in DAG order; each is the module of the same name, with `run(params)`.
STAGES = ("fetch_weights", "fetch_data", "preprocess", "train", "evaluate", "deploy", "report")
# The stages that load models/base: they run in the environment its backend needs (backends, legacy_env).
MODEL_STAGES = ("preprocess", "train", "evaluate", "deploy")
STAGE_HELP = {
    "fetch_weights": "put the base model and tokenizer in models/base/",
    "fetch_data": "write ADGEN-shaped data/raw/train.json and dev.json",
    "preprocess": "apply the prompt template, tokenize and truncate into data/processed/",
    "train": "learn the P-tuning v2 prefix into models/ptuning/",
    "evaluate": "generate for the dev set, score BLEU-4 / ROUGE into reports/metrics.json",
    "deploy": "write the serving bundle to models/deploy/ and smoke-test it",
    "report": "write reports/report.md",
}


def run_stage(stage: str, params_path: str) -> None:
    from . import config, determinism, stagelog

    stagelog.record_start(stage)
    determinism.configure_threads()
    params = config.load(params_path)
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
    return parser


def _switch_environment(argv: list[str]) -> None:
    """Re-execute this command in the legacy environment when models/base needs ChatGLM-6B's remote code."""
    if backends.needs_legacy_env(Path("models/base")) and not legacy_env.is_current():
        legacy_env.reexec("ptune.cli", argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # transformers' advisory warnings (e.g. about generation flags) are noise in stage logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command in MODEL_STAGES:
            _switch_environment(argv)
        if args.command in STAGES:
            run_stage(args.command, args.params)
        elif args.command == "validate":
            from . import config

            config.load(args.params)
            print(f"{args.params}: valid")
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
