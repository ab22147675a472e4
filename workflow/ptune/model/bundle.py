"""A deploy bundle: what serving needs to answer as the P-tuned model does, loaded in one call.

models/deploy/
  bundle.json    the base model's record (model/origin.py: its hub repository and commit, or git URL and commit, or
                 a local path where that is all there is; its backend, config hash and each weight file's sha256),
                 how to load it
                 (quantization), the prompt format the prefix was trained on (prompts.PromptFormat: the templates
                 or the chat template's text), generation settings
  prefix/        the trained prefix (prefix.safetensors + prefix_config.json), copied from models/ptuning
  README.md      the model card: the hub's YAML front matter (base_model, datasets, tags, model-index), what was
                 tuned on what, its scores, how to serve it

`python -m ptune.bundle DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle]` loads a bundle in a fresh
process and prints one answer with its latency as JSON. A bundle of a chatglm base runs in the legacy environment
(legacy_env); the command switches to it by itself. Its base's Python code runs only with the user's consent
(trust.user_trusts), never because the bundle or the base says so.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import GenerationConfig
from ..data.prompts import Prompter, PromptFormat, Turn
from ..errors import PtuneError
from . import backends, legacy_env, origin, trust

# torch and the loaders are imported where a model loads: reading and checking a bundle (and the refusals, and
# `ptune publish`) needs neither.

MANIFEST = "bundle.json"
# 2: the prompt format (templates or chat template) replaced format 1's prompt_template, which served multi-turn
# conversations in another format than training's.
# 3: the base named by its origin (hub repository and commit, git URL and commit) and its weights' sha256, replacing
# format 2's local path `base_model`, which a bundle copied to another machine could not find.
FORMAT_VERSION = 3


@dataclass
class Bundle:
    tokenizer: object
    model: object
    encoder: object | None
    prompt: PromptFormat
    generation: GenerationConfig
    backend: object

    @classmethod
    def load(
        cls,
        directory: str | Path,
        with_prefix: bool = True,
        trust_remote_code: bool = False,
        base: str | Path | None = None,
        allow_pickle: bool = False,
    ) -> "Bundle":
        """`trust_remote_code`: the user's consent (trust.user_trusts) to run the Python code of a chatglm base;
        without it such a bundle is refused before any of that code is imported. `base`: the folder
        origin.resolve already found and checked for this bundle (the serving commands resolve it first, with the
        user's --base and consent); None: resolve it here, with `allow_pickle` as the user's consent to pickles."""
        manifest = read_manifest(directory)
        if base is None:
            base = origin.resolve(directory, manifest, None, allow_pickle_flag=allow_pickle)
        from .loading import device

        base = Path(base)
        backend = backends.for_base(base)
        if backend.name == backends.CHATGLM:
            trust.require_consent(base, trust_remote_code, f"the bundle {directory}")
        model, encoder = backend.load_for_inference(
            base, prefix_folder(directory, manifest), device(), manifest.get("quantization", "none")
        )
        return cls(
            backend.load_tokenizer(base),
            model,
            encoder if with_prefix else None,
            PromptFormat.from_dict(manifest["prompt"]),
            GenerationConfig(**manifest["generation"]),
            backend,
        )

    def prompter(self) -> Prompter:
        return Prompter(self.prompt, self.tokenizer, self.backend)

    def answer(self, content: str, seed: int = 0, history: Sequence[tuple[str, str]] = ()) -> str:
        """One answer, its prompt built as the server builds it (no engine, no thread, no truncation)."""
        import torch

        from .generation import generation_kwargs

        prompter = self.prompter()
        ids = prompter.ids(Turn.of(content, list(history) or None))  # no history: none at all, as model.chat
        torch.manual_seed(seed)
        new = self.backend.generate(
            self.model,
            self.encoder,
            self.tokenizer,
            [ids],
            generation_kwargs(
                self.generation, self.tokenizer, prompter.stop_ids(self.model.generation_config.eos_token_id)
            ),
        )
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def read_manifest(directory: str | Path) -> dict:
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise PtuneError(f"{manifest_path}: missing; build the bundle with `dvc repro deploy` (or `ptune deploy`)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    found = manifest.get("format")
    if found == 1:
        raise PtuneError(
            f"{manifest_path}: bundle format 1, written before ptune recorded the prompt format a prefix "
            "was trained on (its multi-turn prompts differed from training's); rebuild it with "
            "`dvc repro deploy` (or `ptune deploy`)"
        )
    if found == 2:
        raise PtuneError(
            f"{manifest_path}: bundle format 2, written before ptune recorded where a bundle's base model comes "
            "from (it named the local path models/base, which another machine does not have, and did not check the "
            "base's weights); rebuild it with `dvc repro deploy` (or `ptune deploy`)"
        )
    if found != FORMAT_VERSION:
        raise PtuneError(
            f"{manifest_path}: bundle format {found!r}, this ptune reads {FORMAT_VERSION}; rebuild it "
            "with `dvc repro deploy` (or `ptune deploy`)"
        )
    return manifest


def prefix_folder(directory: str | Path, manifest: dict) -> Path:
    """The bundle's own prefix folder, as bundle.json's `prefix` names it: a plain folder name inside the bundle (deploy
    writes "prefix"), a real folder, not a link. bundle.json is the word of whoever made the bundle: `..`, `.` or a
    link would have serving load, and `ptune publish` upload, files from anywhere on this machine."""
    name = manifest.get("prefix")
    folder = Path(directory) / str(name)
    if not trust.is_plain_name(name) or folder.is_symlink() or not folder.is_dir():
        raise PtuneError(
            f"{Path(directory) / MANIFEST}: prefix {name!r} is not the name of a folder inside the bundle (deploy "
            'writes "prefix", a folder, not a link); rebuild the bundle with `dvc repro deploy` (or `ptune deploy`)'
        )
    return folder


def _parse(argv: list[str]) -> tuple[str, str, str | None, bool, bool]:
    """DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle], in any order."""
    flags = {trust.TRUST_FLAG: False, origin.ALLOW_PICKLE_FLAG: False}
    base, rest, args = None, [], iter(argv)
    for arg in args:
        if arg in flags:
            flags[arg] = True
        elif arg == "--base":
            base = next(args, None)
            if base is None:
                raise PtuneError("--base: give the base model's folder")
        else:
            rest.append(arg)
    if len(rest) != 2:
        raise PtuneError("usage: python -m ptune.bundle DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle]")
    return rest[0], rest[1], base, flags[trust.TRUST_FLAG], flags[origin.ALLOW_PICKLE_FLAG]


def main(argv: list[str]) -> int:
    try:
        directory, prompt, base_dir, flag, allow_pickle = _parse(argv)
        manifest = read_manifest(directory)
        if manifest.get("backend") == backends.CHATGLM:
            local = origin.local_base(directory, base_dir)
            consent = trust.user_trusts(local or manifest["base"].get("repo", ""), flag, "params.yaml")
            trust.require_consent(local or Path(str(manifest["base"].get("repo"))), consent, f"the bundle {directory}")
            if not legacy_env.is_current():
                legacy_env.reexec("ptune.bundle", argv)
        t0 = time.perf_counter()
        base = origin.resolve(directory, manifest, base_dir, allow_pickle_flag=allow_pickle, params="params.yaml")
        consent = trust.user_trusts(base, flag, "params.yaml")
        bundle = Bundle.load(directory, trust_remote_code=consent, base=base)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    answer = bundle.answer(prompt)
    t2 = time.perf_counter()
    print(
        json.dumps({"answer": answer, "load_s": round(t1 - t0, 3), "latency_s": round(t2 - t1, 3)}, ensure_ascii=False)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
