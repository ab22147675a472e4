"""The embedded tokenizer and model, and the P-tuning v2 prefix on transformers v5."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmConfig, GlmForCausalLM

from ptune.compute.evaluation import generate_all
from ptune.config import EmbeddedModelConfig, GenerationConfig
from ptune.errors import PtuneError
from ptune.model import embedded, prefixed
from ptune.model.backends import native
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for

TINY = EmbeddedModelConfig(
    seed=3,
    vocab_size=600,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
    corpus_size=200,
    pretrain_steps=3,
    pretrain_batch_size=2,
    pretrain_seq_len=32,
    pretrain_learning_rate=0.003,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    embedded.build(TINY, out)
    return out


def test_tokenizer_round_trips_any_text(base_dir):
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    for text in ["类型#上衣*颜色#白色", "  two  spaces\nand a newline\t", "emoji 🙂 and ＡＢＣ，。", "ǅ ẞ ÿ"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_saved_model_loads_through_auto_classes(base_dir):
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    assert type(model).__name__ == "GlmForCausalLM"


def test_build_is_deterministic(base_dir, tmp_path):
    embedded.build(TINY, tmp_path)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (base_dir / name).read_bytes(), name


def _tiny_model(layers=2):
    torch.manual_seed(0)
    cfg = GlmConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
    )
    return GlmForCausalLM(cfg).eval()


@pytest.mark.parametrize("projection", [False, True])
def test_batched_greedy_equals_one_at_a_time_with_prefix(projection):
    model = _tiny_model()
    encoder = PrefixEncoder(prefix_config_for(model, 5, projection, 24, "tiny"))
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 1)

    class Tok:  # just the ids generation needs
        pad_token_id, eos_token_id = 0, 3

        @staticmethod
        def batch_decode(rows, skip_special_tokens):
            return [" ".join(str(t) for t in r.tolist() if t not in (0, 3)) for r in rows]

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [20]]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, top_p=0.7, temperature=0.95)
    batched = generate_all(model, encoder, Tok, prompts, cfg, batch_size=4, seed=0, desc="b", backend=native())
    single = generate_all(model, encoder, Tok, prompts, cfg, batch_size=1, seed=0, desc="s", backend=native())
    assert batched == single
    plain = generate_all(model, None, Tok, prompts, cfg, batch_size=4, seed=0, desc="p", backend=native())
    assert plain != batched  # the prefix really reaches generate()


def test_training_forward_updates_only_the_prefix():
    model = _tiny_model()
    model.requires_grad_(False)
    encoder = PrefixEncoder(prefix_config_for(model, 4, False, 16, "tiny"))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = prefixed.forward(model, encoder, ids, mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert encoder.embedding.weight.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_prefix_refuses_another_base(tmp_path):
    encoder = PrefixEncoder(prefix_config_for(_tiny_model(2), 4, False, 16, "two-layer"))
    encoder.save(tmp_path)
    assert PrefixEncoder.load(tmp_path, _tiny_model(2)).config.pre_seq_len == 4
    with pytest.raises(PtuneError, match="trained on base 'two-layer'"):
        PrefixEncoder.load(tmp_path, _tiny_model(3))
