"""Stage deploy: write the bundle to models/deploy/, load it in a fresh process, answer one prompt.

The answer and its latency go to reports/deploy_check.json. A bundle that fails its smoke test is never
published: the check runs on the temporary directory before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from . import atomic, backends
from .bundle import FORMAT_VERSION, MANIFEST
from .config import GenerationConfig, Params
from .errors import PtuneError

BASE = Path("models/base")
PREFIX = Path("models/ptuning")
OUT = Path("models/deploy")
METRICS = Path("reports/metrics.json")
CHECK = Path("reports/deploy_check.json")

LAUNCH = """# ptune deploy bundle

Base model: `{base}` · prefix: `prefix/` (pre_seq_len {pre_seq_len}) · prompt template: `{template}`

Evaluated on {n_examples} dev examples: {scores}

Answer one prompt from the project root:

    python -m ptune.bundle {bundle} '{prompt}'

Restore it on a fresh instance with `dvc pull` (the base model and this bundle are DVC outputs).
"""


def run(params: Params) -> None:
    cfg = params.deploy
    backend = backends.for_base(BASE)
    prefix_cfg = backend.describe_prefix(PREFIX, BASE)
    metrics = json.loads(METRICS.read_text(encoding="utf-8"))
    scores = ", ".join(f"{k.upper()} {v:.2f}" for k, v in sorted(metrics["ptuned"].items()))
    generation = GenerationConfig(cfg.max_new_tokens, cfg.do_sample, cfg.top_p, cfg.temperature)
    with atomic.atomic_dir(OUT) as tmp:
        shutil.copytree(PREFIX, tmp / "prefix")
        atomic.write_json(tmp / MANIFEST, {
            "format": FORMAT_VERSION,
            "base_model": str(BASE),
            "backend": backend.name,
            "quantization_bit": params.evaluate.quantization_bit,  # served as it was evaluated
            "base_config_sha256": prefix_cfg["base_config_sha256"],
            "prefix": "prefix",
            "prompt_template": params.preprocess.prompt_template,
            "generation": asdict(generation),
            "evaluation": {"n_examples": metrics["n_examples"], "ptuned": metrics["ptuned"]},
        })
        atomic.write_text(tmp / "README.md", LAUNCH.format(
            base=BASE, pre_seq_len=prefix_cfg["pre_seq_len"], template=params.preprocess.prompt_template,
            bundle=OUT, prompt=cfg.smoke_prompt, n_examples=metrics["n_examples"], scores=scores))
        check = smoke_test(tmp, cfg.smoke_prompt)
    atomic.write_json(CHECK, {"bundle": str(OUT), "prompt": cfg.smoke_prompt, **check})


def smoke_test(bundle: Path, prompt: str) -> dict:
    """Load the bundle in a fresh Python process (as a server would) and answer `prompt`."""
    proc = subprocess.run([sys.executable, "-m", "ptune.bundle", str(bundle), prompt],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise PtuneError(f"deploy smoke test failed: the bundle in {bundle} did not load and answer:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
