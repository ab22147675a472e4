"""Generation settings and the arguments of generate(), each in one place: evaluate's batches
(compute/evaluation.py), a deploy bundle's answer (bundle/loader.py) and serving's scheduler and one-at-a-time path
(serve/engine.py, serve/batching.py) all generate with a `Settings` through `generation_kwargs`.

Serving's requests may also name stop strings and ask for log-probabilities (`Settings.stop`, `Settings.logprobs`);
what they need of the tokenizer is here too, so that the scheduler (in a thread or its own process) and the
one-at-a-time path end an answer and describe its tokens alike: `stop_check` (transformers' StopStringCriteria on
the answer's own tokens), `first_stop` (where the text is cut), `token_bytes` (a token's own bytes).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import GenerationConfig


@dataclass(frozen=True)
class Settings(GenerationConfig):
    """The one settings type generation runs with: the params' generation keys (config.GenerationConfig: evaluate's
    and deploy's sections, a bundle's `generation`) and a seed. A request's seed is its own; evaluate seeds each
    batch with its section's seed + the batch's index, so its settings carry none."""

    seed: int | None = None
    # Serving only (evaluate and a bundle's answer leave them unset): the strings an answer ends before, and how many
    # alternatives to report per token with its log-probability (None: no log-probabilities; 0: the token's alone).
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

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


# Stop-string checks by (tokenizer, strings): building one reads the whole vocabulary (tens of ms for a large one),
# and clients send the same few strings with every request.
_STOP_CHECKS: OrderedDict[tuple[int, tuple[str, ...]], tuple[object, Callable[[Sequence[int]], bool]]] = OrderedDict()
_STOP_LOCK = threading.Lock()


def stop_check(tokenizer, stop: Sequence[str]) -> Callable[[Sequence[int]], bool] | None:
    """A check of an answer's new token ids: whether they now end with one of the `stop` strings (None: no strings).
    transformers' StopStringCriteria does the matching (any token alignment, without decoding); transformers 4.33
    (ChatGLM-6B's environment) has none, and there the answer's text is decoded and searched (one request at a time
    there, so the decoding costs little)."""
    stop = tuple(stop)
    if not stop:
        return None
    key = (id(tokenizer), stop)
    with _STOP_LOCK:
        found = _STOP_CHECKS.get(key)
        if found is not None and found[0] is tokenizer:
            _STOP_CHECKS.move_to_end(key)
            return found[1]
    try:
        from transformers import StopStringCriteria
    except ImportError:
        check = _TextStop(tokenizer, stop)
    else:
        check = _TokenStop(StopStringCriteria(tokenizer, list(stop)))
    with _STOP_LOCK:
        _STOP_CHECKS[key] = (tokenizer, check)
        if len(_STOP_CHECKS) > 32:
            _STOP_CHECKS.popitem(last=False)
    return check


class _TokenStop:
    def __init__(self, criterion):
        self.criterion = criterion
        self.lock = threading.Lock()  # the criterion moves its tensors to the ids' device on each call

    def __call__(self, ids: Sequence[int]) -> bool:
        import torch

        # A stop string of k characters spans at most k tokens: the criterion reads no further back.
        tail = torch.tensor([list(ids[-self.criterion.maximum_token_len :])], dtype=torch.long)
        with self.lock:
            return bool(self.criterion(tail, None)[0])


class _TextStop:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop

    def __call__(self, ids: Sequence[int]) -> bool:
        return first_stop(self.tokenizer.decode(list(ids), skip_special_tokens=True), self.stop) is not None


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the `stop` strings begins in `text` (None: none is there): the answer ends before it."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """A token id's own bytes, as the tokenizer's decoder writes them: a byte-fallback token (`<0xE4>`) is that byte,
    a byte-level BPE token (GPT-2's, Qwen's) the bytes its characters stand for, any other the text it decodes to
    after a fixed prefix (so that a word-start marker decodes as the space it is, not as nothing at the start). A
    token may hold part of a character: only the bytes of consecutive tokens together are always text."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = decoder is not None and "ByteLevel" in repr(decoder)
    unbyte = None
    if byte_level:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unbyte = {c: b for b, c in bytes_to_unicode().items()}
    prefix = "abcdef"
    base = tokenizer.convert_ids_to_tokens(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    def of(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
            return bytes([int(m[1], 16)])
        if unbyte is not None and all(c in unbyte for c in piece):
            return bytes(unbyte[c] for c in piece)
        text = tokenizer.convert_tokens_to_string([*base, piece])
        at = text.find(prefix)
        return (text[at + len(prefix) :] if at >= 0 else text).encode("utf-8")

    return of
