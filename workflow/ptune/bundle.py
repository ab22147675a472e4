"""A deploy bundle: what serving needs to answer as the P-tuned model does, loaded in one call.

models/deploy/
  bundle.json    base model path (relative to the project root) and its config hash, prompt template,
                 generation settings
  prefix/        the trained prefix (prefix.safetensors + prefix_config.json), copied from models/ptuning
  README.md      how to start it

`python -m ptune.bundle DIR PROMPT` loads a bundle in a fresh process and prints one answer with its latency
as JSON: the deploy stage's smoke test.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GenerationConfig
from .errors import PtuneError
from .generation import generation_kwargs, left_pad
from .model import device, load_frozen, load_tokenizer
from .prefix_encoder import PrefixEncoder
from .preprocess import format_prompt
from . import prefixed

MANIFEST = "bundle.json"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    tokenizer: object
    model: object
    encoder: PrefixEncoder | None
    prompt_template: str
    generation: GenerationConfig

    @classmethod
    def load(cls, directory: str | Path, with_prefix: bool = True) -> "Bundle":
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise PtuneError(f"{manifest_path}: missing; build the bundle with `ptune deploy`")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            raise PtuneError(f"{manifest_path}: bundle format {manifest.get('format')!r}, this ptune reads "
                             f"{FORMAT_VERSION}; rebuild it with `ptune deploy`")
        base = Path(manifest["base_model"])
        model = load_frozen(base, device())
        encoder = None
        if with_prefix:
            encoder = PrefixEncoder.load(directory / manifest["prefix"], model).to(model.device)
            encoder.eval()
        return cls(load_tokenizer(base), model, encoder, manifest["prompt_template"],
                   GenerationConfig(**manifest["generation"]))

    def answer(self, content: str, seed: int = 0) -> str:
        prompt = format_prompt(self.prompt_template, content)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids, mask = left_pad([ids], self.tokenizer.pad_token_id, self.model.device)
        torch.manual_seed(seed)
        new = prefixed.generate(self.model, self.encoder, input_ids, mask,
                                generation_kwargs(self.generation, self.tokenizer))
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def main(argv: list[str]) -> int:
    directory, prompt = argv
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
