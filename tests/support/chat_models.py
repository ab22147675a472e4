"""Stand-ins for the presets' chat models: tiny random models whose tokenizers carry the real chat templates of the
presets' pinned revisions (tests/fixtures/chat_templates/, sources in its SOURCES.md) and their special tokens.

The weights are random and the vocabulary is small (no hub in tests), but what decides a prompt is real: the
template text, the special tokens it writes, the EOS and the end-of-turn tokens.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

PRESETS = {
    # zai-org/glm-4-9b-chat-hf: GlmForCausalLM; generation_config.json stops on <|endoftext|>, <|user|>, <|observation|>
    "glm4-9b-chat": {
        "template": "glm-4-9b-chat-hf.jinja",
        "architecture": "glm",
        "specials": [
            "<|endoftext|>",
            "[MASK]",
            "[gMASK]",
            "[sMASK]",
            "<sop>",
            "<eop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
        ],
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "stop": ["<|endoftext|>", "<|user|>", "<|observation|>"],
    },
    # Qwen/Qwen2.5-0.5B-Instruct: Qwen2ForCausalLM; generation_config.json stops on <|im_end|>, <|endoftext|>
    "qwen2.5-0.5b-t4": {
        "template": "qwen2.5-0.5b-instruct.jinja",
        "architecture": "qwen2",
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "stop": ["<|im_end|>", "<|endoftext|>"],
    },
}


def build(out: Path, preset: str) -> None:
    """A model directory for `preset` at `out`, as fetch_weights would leave it (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, GlmConfig, Qwen2Config

    from ptune.data import synthetic_adgen
    from ptune.model import embedded

    spec = PRESETS[preset]
    texts = [t for ex in synthetic_adgen.generate(5, 300) for t in (ex["content"], ex["summary"])]
    tok = embedded.build_tokenizer(texts + ["有红色的吗", "再写一句", "你是谁"], 600)
    tok.add_special_tokens({"additional_special_tokens": spec["specials"]})
    tok.eos_token, tok.pad_token = spec["eos"], spec["pad"]
    tok.chat_template = (TEMPLATES / spec["template"]).read_text(encoding="utf-8")
    stop = tok.convert_tokens_to_ids(spec["stop"])
    shape = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id,
    )
    config = GlmConfig(head_dim=16, **shape) if spec["architecture"] == "glm" else Qwen2Config(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
