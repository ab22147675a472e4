"""Build a tiny, randomly initialised ChatGLM-6B model directory from the snapshot's remote code.

    <legacy python> tests/support/chatglm_tiny.py OUT_DIR [SNAPSHOT_DIR]

Runs in the legacy environment (transformers 4.33, sentencepiece). The remote code (configuration, modeling,
tokenization, quantization_chatglm.py) is copied from ../shared/chatglm-6b-snapshot into OUT_DIR, never into the
repository; its config.json is shrunk (2 layers, hidden size 32); the real tokenizer model (ice_text.model, a Git
LFS pointer in the snapshot) is replaced by a small sentencepiece model trained here on generated ADGEN-shaped text,
with the special pieces the ChatGLM tokenizer expects ([MASK], [gMASK], <sop>, <eop>, <n>, blanks...).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO.parent / "shared" / "chatglm-6b-snapshot"
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
# SPTokenizer's special pieces, then what its preprocessing maps newlines, tabs and runs of spaces to.
SPECIAL_PIECES = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<unused_0>",
    "<sop>",
    "<eop>",
    "<ENC>",
    "<dBLOCK>",
    "<n>",
    "<|tab|>",
] + [f"<|blank_{n}|>" for n in range(2, 81)]
SHAPE = {
    "hidden_size": 32,
    "inner_hidden_size": 64,
    "num_attention_heads": 2,
    "num_layers": 2,
    "max_sequence_length": 512,
}


def train_tokenizer(out: Path, texts: list[str]) -> dict[str, int]:
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "ice_text"),
        vocab_size=800,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        user_defined_symbols=SPECIAL_PIECES,
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    corpus.unlink()
    (out / "ice_text.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "ice_text.model"))
    ids = {
        name: sp.piece_to_id(piece)
        for name, piece in (
            ("mask", "[MASK]"),
            ("gmask", "[gMASK]"),
            ("bos", "<sop>"),
            ("eos", "<eop>"),
            ("pad", "<pad>"),
        )
    }
    ids["vocab_size"] = sp.vocab_size()
    return ids


def build(out: Path, snapshot: Path = SNAPSHOT, seed: int = 0) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    from ptune.data import synthetic_adgen

    out.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE:
        shutil.copyfile(snapshot / name, out / name)
    texts = [t for ex in synthetic_adgen.generate(seed + 1, 400) for t in (ex["content"], ex["summary"])]
    ids = train_tokenizer(out, texts)
    config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    config.update(
        SHAPE,
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        mask_token_id=ids["mask"],
        gmask_token_id=ids["gmask"],
        pad_token_id=ids["pad"],
    )
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(snapshot / "tokenizer_config.json", out / "tokenizer_config.json")

    torch.manual_seed(seed)
    model = AutoModel.from_config(
        AutoConfig.from_pretrained(str(out), trust_remote_code=True), trust_remote_code=True, empty_init=False
    )  # empty_init=True leaves memory as is
    model.save_pretrained(str(out))
    # save_pretrained copies the remote code again: keep the snapshot's files, byte for byte.
    for name in REMOTE_CODE:
        shutil.copyfile(snapshot / name, out / name)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else SNAPSHOT)
