"""The chatglm backend: ChatGLM-6B through its own remote code, with its built-in prefix and quantize().

How it differs from transformers-native models (native.TransformersBackend), and why:
- Its model and tokenizer code ships with the weights (`trust_remote_code`) and needs transformers 4.27–4.33, so this
  module runs in the legacy environment (legacy_env); its auto_map has no AutoModelForCausalLM: AutoModel loads it.
- P-tuning v2 is built in: `config.pre_seq_len` / `prefix_projection` make the model create
  `transformer.prefix_encoder` and feed its output in as past keys/values, with its own dropout (0.1 in the remote
  code; set from train.prefix_dropout here). The MLP of `prefix_projection` is hidden_size wide, fixed by that code.
- `model.quantize(bits)` swaps its linear layers for INT4/INT8 ones whose kernels are CUDA cubins (sm_61 to sm_86).
- Inputs are built as the reference P-tuning builds them: prompt ids + [gMASK] <sop> + target ids + <eop> for
  training, labels from <sop> on; prompt ids + [gMASK] <sop> for generation (the prompt's text: data/prompts.py);
  the model derives its 2D positions and attention mask from where <sop> stands, and its tokenizer pads on the left.
- The prefix is saved with the reference checkpoint's tensor names, `transformer.prefix_encoder.*` in fp32, twice:
  `model.safetensors` (what ptune loads: never a pickle for its own artefacts) and `pytorch_model.bin` (what the
  reference web_demo.sh loads). A reference checkpoint directory (checkpoint-3000/, pytorch_model.bin only) loads
  here when params allow pickles (fetch_weights.allow_pickle); prefix_config.json adds what ptune checks.

Only the first ChatGLM-6B generation is implemented: ChatGLM2/3-6B build their inputs differently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.batching import IGNORE_INDEX, right_pad
from ..errors import PtuneError
from ..state import atomic
from . import checks, trust

log = logging.getLogger(__name__)

REFERENCE_PICKLE = "pytorch_model.bin"  # the reference trainer's name for it (a pickle)
SAFETENSORS_NAME = "model.safetensors"  # what the reference trainer writes on transformers >= 4.35; ptune reads it
CONFIG_NAME = "prefix_config.json"
KEY_PREFIX = "transformer.prefix_encoder."
# The compute capabilities quantization.py's INT4/INT8 cubins cover (sm_61, 62, 70, 72, 75, 80, 86): a cubin runs
# on its own major version at an equal or higher minor one, and there is no PTX to compile for newer GPUs.
QUANT_MIN_CAPABILITY = (6, 1)
QUANT_MAX_MAJOR = 8
BITS = {"none": None, "4bit": 4, "8bit": 8}  # train/evaluate.quantization -> quantize(bits)


def _auto():
    # Imported here: transformers 4.33 is only present in the legacy environment.
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    return AutoConfig, AutoModel, AutoTokenizer


def _require_first_generation(config, base: Path) -> None:
    if not hasattr(config, "position_encoding_2d") or not hasattr(config, "gmask_token_id"):
        raise PtuneError(
            f"{base}: the chatglm backend implements ChatGLM-6B (the first generation: 2D positions, "
            "[gMASK] <sop>); this model's config has neither position_encoding_2d nor gmask_token_id "
            "(ChatGLM2/3-6B?), and its inputs would be built wrongly"
        )


# The config keys that fix ChatGLM-6B's architecture (checks.config_sha256).
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "inner_hidden_size",
    "position_encoding_2d",
)


def config_sha256(config) -> str:
    return checks.config_sha256(config, ARCHITECTURE_KEYS)


class ChatGLMBackend:
    """ChatGLM-6B's remote code (backends.Backend; no state, as native.TransformersBackend)."""

    name = "chatglm"  # backends.CHATGLM
    # Its remote code generates (transformers 4.33, no cache classes to merge rows with): served one at a time.
    batched_scheduler = False
    multi_device_training = False  # its prefix lives inside the remote-code model, trained on one GPU
    runs_model_code = True
    chat_templates = False  # ChatGLM-6B's tokenizer has none: prompt_format chatglm6b is its own format
    token_offsets = False  # its own (slow) tokenizer cannot say where a token came from
    # Serving refuses log-probabilities (400): they would come from a logits processor run inside its remote code's
    # generate, and no test covers that code with one.
    logprobs = False
    several_prefixes = False  # the remote code builds the prefix into the model it loads: one bundle per load

    def load_tokenizer(self, base: Path):
        _, _, AutoTokenizer = _auto()
        if not (base / "tokenizer_config.json").is_file():
            raise PtuneError(
                f"{base}: no tokenizer here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first"
            )
        trust.require_remote_code(base)
        return AutoTokenizer.from_pretrained(str(base), trust_remote_code=True)

    def encode_text(self, tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text=text, add_special_tokens=False)

    def prompt_specials(self, tokenizer) -> list[int]:
        """[gMASK] <sop>: what follows every prompt (the model finds where the answer starts by <sop>)."""
        return tokenizer.build_inputs_with_special_tokens([])

    def prompt_budget(self, max_source_length: int, training: bool) -> int:
        """As the reference: a training prompt is cut to max_source_length - 1 tokens before [gMASK] <sop> are added
        (max_source_length + 1 in all); a dev prompt is max_source_length with them (its tokenizer's truncation)."""
        return max_source_length + 1 if training else max_source_length

    def encode_train(
        self, tokenizer, prompts: Sequence[list[int]], answers: Sequence[str], max_target_length: int, end_of_turn: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """As the reference: prompt [gMASK] <sop> target <eop>, the target cut to max_target_length - 2; labels
        -100 up to <sop>, which is itself a label."""
        input_ids, labels = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            b = tokenizer.encode(text=answer, add_special_tokens=False)[: max_target_length - 2]
            ids = list(prompt) + b + [end_of_turn]
            context = len(prompt) - 1  # <sop>, the prompt's last token
            input_ids.append(ids)
            labels.append([IGNORE_INDEX] * context + ids[context:])
        return input_ids, labels

    def encode_labels(self, tokenizer, targets: Sequence[str], max_target_length: int) -> list[str]:
        """As the reference: the target tokenized with max_length and decoded without special tokens. ([gMASK] is
        not one of them for this tokenizer, so labels end with it exactly as the reference's do, and scores stay
        comparable with its figures.)"""
        t_ids = tokenizer(text_target=list(targets), max_length=max_target_length, truncation=True)["input_ids"]
        return tokenizer.batch_decode(t_ids, skip_special_tokens=True)

    def load_for_training(self, base: Path, dev: torch.device, dtype: torch.dtype, cfg):
        if cfg.prefix_projection:
            log.info(
                "prefix_projection: ChatGLM-6B's prefix MLP is hidden_size wide; train.prefix_hidden_size "
                "(%d) does not apply",
                cfg.prefix_hidden_size,
            )
        self.check_quantization(cfg.quantization, "train", dev, dtype)  # before minutes of loading
        model = _load(base, cfg.pre_seq_len, cfg.prefix_projection)
        model.transformer.dropout.p = cfg.prefix_dropout
        model = _place(model, dev, dtype, BITS[cfg.quantization], "train")
        prefix = model.transformer.prefix_encoder
        # from_pretrained leaves the prefix (absent from the checkpoint) as it finds the memory on transformers
        # 4.27-4.30 and initialises it on 4.33: start every run from torch's own initialisation, seeded, in fp32.
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            for module in prefix.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return model, prefix

    def load_for_inference(
        self, base: Path, prefix_dir: Path, dev: torch.device, quantization: str = "none", allow_pickle: bool = False
    ):
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        self.check_quantization(quantization, "evaluate", dev, dtype)
        state, pre_seq_len, projection = read_prefix(prefix_dir, allow_pickle)
        model = _load(base, pre_seq_len, projection)
        meta = prefix_dir / CONFIG_NAME
        if meta.is_file():
            recorded = json.loads(meta.read_text(encoding="utf-8"))
            if recorded.get("base_config_sha256") is not None:
                checks.require_same_base(
                    prefix_dir, recorded.get("base_model"), recorded["base_config_sha256"], config_sha256(model.config)
                )
        _check_shapes(state, model, prefix_dir)  # before quantizing: that takes minutes on the real model
        model = _place(model, dev, dtype, BITS[quantization], "evaluate")
        prefix = model.transformer.prefix_encoder
        prefix.load_state_dict(state)  # after _place, so the fp32 values are kept exactly
        prefix.eval()
        return model, prefix

    def check_quantization(self, mode: str, section: str, dev: torch.device, dtype: torch.dtype | None = None) -> None:
        """Fail at once where the model's own quantize() cannot run (before minutes of loading)."""
        if BITS[mode] is not None:
            _check_quantization(dev, mode, section, dtype)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ids and labels; no attention mask: the model builds its own from where <sop> is."""
        ids, labels, _ = right_pad(rows, pad_id)
        return {"input_ids": ids, "labels": labels}

    def loss(self, model, prefix, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The prefix is part of the model: its dropout follows the prefix's train/eval mode. None: the base alone
        # (evaluate scores its general set with the prefix off too).
        if prefix is not None:
            model.transformer.dropout.train(prefix.training)
        # A quantized model runs as the reference runs it, fp16 without autocast: quantize()'s autograd function
        # saves its input as it comes (fp32 out of an autocast LayerNorm) and its backward then mixes dtypes.
        plain = (
            torch.autocast(batch["input_ids"].device.type, enabled=False)
            if getattr(model, "quantized", False)
            else contextlib.nullcontext()
        )
        without = prefix_off(model) if prefix is None else contextlib.nullcontext()
        with plain, without:
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.float()

    def generate(self, model, prefix, tokenizer, prompts: Sequence[Sequence[int]], kwargs: dict) -> torch.Tensor:
        """The tokenizer's own left padding (4D mask, 2D positions), then generate; prefix None: the base alone."""
        batch = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        context = contextlib.nullcontext() if prefix is not None else prefix_off(model)
        # Unset knobs (None: greedy) stay unset: transformers 4.33 warns about each, and its defaults are neutral.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        with context, torch.no_grad():
            out = model.generate(**batch, **kwargs)
        return out[:, batch["input_ids"].shape[1] :]

    def save_prefix(self, model, prefix, directory: Path, base: Path) -> None:
        save_prefix(model, prefix, directory, base)

    def prefix_length(self, model, prefix) -> int:
        """The built-in prefix's length is the model's config.pre_seq_len."""
        return 0 if prefix is None else model.config.pre_seq_len

    def describe_prefix(self, directory: Path, base: Path, allow_pickle: bool = False) -> dict:
        """pre_seq_len and base_config_sha256 of a saved prefix; a reference checkpoint has no prefix_config.json,
        so they come from its tensors and the base's config."""
        if (directory / CONFIG_NAME).is_file():
            return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        _, pre_seq_len, _ = read_prefix(directory, allow_pickle)
        AutoConfig, _, _ = _auto()
        trust.require_remote_code(base)
        config = AutoConfig.from_pretrained(str(base), trust_remote_code=True)
        return {"pre_seq_len": pre_seq_len, "base_config_sha256": config_sha256(config)}

    def load_prefix(self, model, prefix_dir: Path):
        raise PtuneError(
            f"{prefix_dir}: the chatglm backend serves one bundle per server (its prefix is part of the loaded "
            "model); start one server per bundle"
        )

    def copy_prefix(self, source: Path, dest: Path, allow_pickle: bool = False) -> None:
        """The prefix into a deploy bundle; a reference checkpoint (pytorch_model.bin only) gets its
        model.safetensors there, so serving the bundle never unpickles."""
        shutil.copytree(source, dest)
        if not (dest / SAFETENSORS_NAME).is_file():
            state, _, _ = read_prefix(source, allow_pickle)
            _write_safetensors(dest, {KEY_PREFIX + k: v for k, v in state.items()})


@contextlib.contextmanager
def prefix_off(model) -> Iterator[None]:
    """Run the model as if it had no prefix: its forward consults pre_seq_len to add the prefix and its mask."""
    saved = model.transformer.pre_seq_len
    model.transformer.pre_seq_len = None
    try:
        yield
    finally:
        model.transformer.pre_seq_len = saved


def _load(base: Path, pre_seq_len: int, prefix_projection: bool):
    AutoConfig, AutoModel, _ = _auto()
    checks.require_config(base)
    trust.require_remote_code(base)
    config = AutoConfig.from_pretrained(str(base), trust_remote_code=True)
    _require_first_generation(config, base)
    config.pre_seq_len = pre_seq_len
    config.prefix_projection = prefix_projection
    model = AutoModel.from_pretrained(str(base), config=config, trust_remote_code=True)
    model.requires_grad_(False)
    model.transformer.prefix_encoder.requires_grad_(True)
    model.eval()
    return model


def _place(model, dev: torch.device, dtype: torch.dtype, bits: int | None, section: str):
    """On the device in `dtype`, or quantized (fp16 activations); the prefix in fp32 either way, as the reference."""
    if bits is None:
        model = model.to(device=dev, dtype=dtype)
    else:
        try:
            model = model.half().quantize(bits).to(dev)
        except (AttributeError, RuntimeError, OSError) as exc:
            raise PtuneError(
                f"{section}.quantization: {bits}-bit: the model's quantize() failed ({exc}); it needs "
                "cpm_kernels and the CUDA runtime library (libcudart) where cpm_kernels looks for it "
                "(/usr/local/cuda/lib64 or the linker's path)"
            ) from None
    model.transformer.prefix_encoder.float()
    return model


def _check_quantization(dev: torch.device, bits: str, section: str, dtype: torch.dtype | None) -> None:
    if dev.type != "cuda":
        raise PtuneError(
            f"{section}.quantization: {bits} needs a CUDA GPU (ChatGLM-6B's quantize() runs CUDA "
            "kernels); on this machine set train.quantization and evaluate.quantization to none"
        )
    capability = torch.cuda.get_device_capability(dev)
    if capability < QUANT_MIN_CAPABILITY or capability[0] > QUANT_MAX_MAJOR:
        raise PtuneError(
            f"{section}.quantization: {bits}: ChatGLM-6B's INT4/INT8 kernels are built for compute capability "
            f"6.1 to 8.x (Pascal to Ada: V100, T4, A10, A100, L4), and this GPU ({torch.cuda.get_device_name(dev)}) "
            f"is {capability[0]}.{capability[1]}; set {section}.quantization: none (the fp16 model needs about 13 GB)"
        )
    if section == "train" and dtype is not None and dtype != torch.float16:
        raise PtuneError(
            f"train.quantization: {bits} computes in fp16 (its kernels unpack weights to fp16); "
            "set train.precision: fp16"
        )


def _check_shapes(state: dict[str, torch.Tensor], model, prefix_dir: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.transformer.prefix_encoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        layers, hidden = model.config.num_layers, model.config.hidden_size
        raise PtuneError(
            f"{prefix_dir}: the prefix's tensors {found} do not fit this base ({layers} layers, hidden "
            f"size {hidden}: it needs {expected}); load it onto the base it was trained on"
        )


def read_prefix(directory: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], int, bool]:
    """A saved prefix, ours or a reference checkpoint's: its prefix-encoder tensors (keys without
    `transformer.prefix_encoder.`), its pre_seq_len and whether it has the projection MLP, read from the tensors.
    safetensors first; the pickle (pytorch_model.bin) only when `allow_pickle` (fetch_weights.allow_pickle)."""
    path = directory / REFERENCE_PICKLE
    safetensors = directory / SAFETENSORS_NAME
    try:
        if safetensors.is_file():
            from safetensors.torch import load_file

            path, saved = safetensors, load_file(str(safetensors))
        elif path.is_file():
            if not allow_pickle:
                raise PtuneError(
                    f"{path}: a pickle, and pickles can run code when loaded; ptune reads it only with "
                    "fetch_weights.allow_pickle: true in params.yaml (set it if you trust where this "
                    "checkpoint comes from)"
                )
            # weights_only: torch's restricted unpickler, tensors and plain containers only.
            saved = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PtuneError(
                f"{path}: missing; is {directory} a prefix saved by `ptune train` or a reference "
                "P-tuning checkpoint directory (checkpoint-N/ with pytorch_model.bin)?"
            )
    except PtuneError:
        raise
    except Exception as exc:  # a truncated or foreign file: torch and safetensors raise several types
        raise PtuneError(f"{path}: cannot be read as a state dict ({exc})") from None
    state = {k[len(KEY_PREFIX) :]: v for k, v in saved.items() if k.startswith(KEY_PREFIX)}
    if "embedding.weight" not in state:
        found = ", ".join(sorted(saved)[:3]) or "nothing"
        raise PtuneError(f"{path}: holds no {KEY_PREFIX}embedding.weight (found {found}); not a P-tuning prefix")
    return state, state["embedding.weight"].shape[0], "trans.0.weight" in state


def save_prefix(model, prefix, directory: Path, base: Path) -> None:
    """pytorch_model.bin as the reference writes it, and prefix_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {KEY_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in prefix.state_dict().items()}
    _write_safetensors(directory, state)
    # For the reference web_demo.sh, which torch.loads this name. The legacy (non-zip) format: the zip format records
    # a random serialization id, and the same prefix must give the same bytes on a rerun.
    with atomic.atomic_file(directory / REFERENCE_PICKLE, "wb") as fh:
        torch.save(state, fh, _use_new_zipfile_serialization=False)
    rows = state[KEY_PREFIX + "embedding.weight"]
    meta = {
        "backend": ChatGLMBackend.name,
        "base_model": str(base),
        "pre_seq_len": rows.shape[0],
        "prefix_projection": KEY_PREFIX + "trans.0.weight" in state,
        "prefix_dropout": model.transformer.dropout.p,
        "base_config_sha256": config_sha256(model.config),
    }
    atomic.write_json(directory / CONFIG_NAME, meta)


def _write_safetensors(directory: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    with atomic.atomic_file(directory / SAFETENSORS_NAME, "wb") as fh:
        fh.write(save(state, metadata={"format": "pt"}))
