"""A deploy bundle: what serving needs to answer as the P-tuned model does, loaded in one call.

models/deploy/
  bundle.json    base model path (relative to the project root), its backend and config hash, how to load it
                 (quantization), prompt template, generation settings
  prefix/        the trained prefix (prefix.safetensors + prefix_config.json), copied from models/ptuning
  README.md      how to start it

`python -m ptune.bundle DIR PROMPT` loads a bundle in a fresh process and prints one answer with its latency
as JSON: the deploy stage's smoke test. A bundle of a chatglm base runs in the legacy environment (legacy_env);
the command switches to it by itself.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import backends, legacy_env
from .config import GenerationConfig
from .errors import PtuneError
from .generation import generation_kwargs
from .model import device
from .preprocess import format_prompt

MANIFEST = "bundle.json"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    tokenizer: object
    model: object
    encoder: object | None
    prompt_template: str
    generation: GenerationConfig
    backend: object = None  # backends.py; None: transformers-native

    @classmethod
    def load(cls, directory: str | Path, with_prefix: bool = True) -> "Bundle":
        manifest = read_manifest(directory)
        base = Path(manifest["base_model"])
        backend = backends.for_base(base)
        model, encoder = backend.load_for_inference(base, Path(directory) / manifest["prefix"], device(),
                                                    manifest.get("quantization", "none"))
        return cls(backend.load_tokenizer(base), model, encoder if with_prefix else None,
                   manifest["prompt_template"], GenerationConfig(**manifest["generation"]), backend)

    def answer(self, content: str, seed: int = 0) -> str:
        self.backend = self.backend or backends.native()
        ids = self.backend.encode_prompt(self.tokenizer, format_prompt(self.prompt_template, content))
        torch.manual_seed(seed)
        new = self.backend.generate(self.model, self.encoder, self.tokenizer, [ids],
                                    generation_kwargs(self.generation, self.tokenizer))
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def read_manifest(directory: str | Path) -> dict:
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise PtuneError(f"{manifest_path}: missing; build the bundle with `ptune deploy`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        raise PtuneError(f"{manifest_path}: bundle format {manifest.get('format')!r}, this ptune reads "
                         f"{FORMAT_VERSION}; rebuild it with `ptune deploy`")
    return manifest


def main(argv: list[str]) -> int:
    directory, prompt = argv
    try:
        if read_manifest(directory).get("backend") == backends.CHATGLM and not legacy_env.is_current():
            legacy_env.reexec("ptune.bundle", argv)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    bundle = Bundle.load(directory)
    t1 = time.perf_counter()
    answer = bundle.answer(prompt)
    t2 = time.perf_counter()
    print(json.dumps({"answer": answer, "load_s": round(t1 - t0, 3), "latency_s": round(t2 - t1, 3)},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
