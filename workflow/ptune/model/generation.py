"""Generation settings and the arguments of generate(), each in one place: evaluate's batches
(compute/evaluation.py), a deploy bundle's answer (bundle/loader.py) and serving's scheduler and one-at-a-time path
(serve/engine.py, serve/batching.py) all generate with a `Settings` through `generation_kwargs`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import GenerationConfig


@dataclass(frozen=True)
class Settings(GenerationConfig):
    """The one settings type generation runs with: the params' generation keys (config.GenerationConfig: evaluate's
    and deploy's sections, a bundle's `generation`) and a seed. A request's seed is its own; evaluate seeds each
    batch with its section's seed + the batch's index, so its settings carry none."""

    seed: int | None = None

    @classmethod
    def of(cls, cfg: GenerationConfig, seed: int | None = None) -> "Settings":
        """The generation settings of a params section, a bundle or a request (its other keys and seed ignored),
        with `seed`."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerationConfig)}, seed=seed)


def generation_kwargs(cfg: GenerationConfig, tokenizer, stop_ids: Sequence[int] | None = None) -> dict:
    """generate() arguments of generation settings (`Settings`, or the generation keys of a params section), the one
    builder of them; `stop_ids`: the tokens an answer ends with (prompts.Prompter.stop_ids), else EOS."""
    kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": list(stop_ids) if stop_ids else tokenizer.eos_token_id,
    }
    if cfg.do_sample:
        kwargs.update(top_p=cfg.top_p, temperature=cfg.temperature)
    else:
        # Unset sampling knobs a model's generation_config may carry, so greedy really is greedy.
        kwargs.update(top_p=None, top_k=None, temperature=None)
    return kwargs
