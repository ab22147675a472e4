"""A deploy bundle loaded for inference in one call: the base (found and checked by bundle/opening.py), the prefix, the
tokenizer, the prompt format the prefix was trained on and the generation settings the bundle carries.

torch and the loaders are imported where a model loads: reading and checking a bundle needs neither."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.prompts import Prompter, PromptFormat, Turn
from ..errors import PtuneError
from ..model import backends
from ..model.generation import Settings
from . import consent, origin
from .manifest import prefix_folder, read_manifest


@dataclass
class Bundle:
    tokenizer: object
    model: object
    encoder: object | None
    prompt: PromptFormat
    generation: Settings
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
        from ..model.loading import device

        base = Path(base)
        backend = backends.for_base(base)
        if backend.runs_model_code:
            consent.require_consent(base, trust_remote_code, f"the bundle {directory}")
        model, encoder = backend.load_for_inference(
            base, prefix_folder(directory, manifest), device(), manifest.get("quantization", "none")
        )
        return cls(
            backend.load_tokenizer(base),
            model,
            encoder if with_prefix else None,
            PromptFormat.from_dict(manifest["prompt"]),
            Settings(**manifest["generation"]),
            backend,
        )

    def sibling(self, directory: str | Path) -> "Bundle":
        """Another bundle of this bundle's base (opening.check_shared_base has compared their records) on this
        bundle's loaded model: only its prefix loads; its prompt format and generation settings are its own. A
        backend that cannot hold several prefixes on one load (chatglm: the prefix is built into the model) is
        refused, naming the bundle."""
        manifest = read_manifest(directory)
        load_prefix = getattr(self.backend, "load_prefix", None)
        if load_prefix is None:
            raise PtuneError(
                f"--bundle {directory}: the {self.backend.name} backend serves one bundle per server (its prefix is "
                "part of the loaded model); start one server per bundle"
            )
        return Bundle(
            self.tokenizer,
            self.model,
            load_prefix(self.model, prefix_folder(directory, manifest)),
            PromptFormat.from_dict(manifest["prompt"]),
            Settings(**manifest["generation"]),
            self.backend,
        )

    def prompter(self) -> Prompter:
        return Prompter(self.prompt, self.tokenizer, self.backend)

    def answer(self, content: str, seed: int = 0, history: Sequence[tuple[str, str]] = ()) -> str:
        """One answer, its prompt built as the server builds it (no engine, no thread, no truncation)."""
        import torch

        from ..model.generation import generation_kwargs

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
