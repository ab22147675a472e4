"""Training: resume after SIGKILL, other architectures, and the errors users hit with prefixes."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ptune.errors import PtuneError
from ptune.model import prefixed
from ptune.model.loading import check_quantization
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for

PREFIX = "models/ptuning/prefix.safetensors"


def _long_training(project) -> None:
    project.set_param("train.max_steps", 300)
    project.set_param("train.save_steps", 20)
    project.set_param("train.prefix_dropout", 0.1)  # so that resuming must restore the RNG too


# Slow: the default suite kills training through tests/test_faults.py (seeded) and test_parallel.py.
@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(ran_project):
    p = ran_project
    _long_training(p)
    p.run("ptune", "train")
    uninterrupted = load_file(str(p.root / PREFIX))

    ckpts = p.root / ".ptune" / "state" / "train"
    proc = subprocess.Popen(
        ["ptune", "train"], cwd=p.root, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        found = list(ckpts.glob("*/checkpoint-*.safetensors")) if ckpts.is_dir() else []
        if any(int(f.stem.split("-")[1]) >= 40 for f in found):  # progress-triggered: after step 40's checkpoint
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    p.clear_log()

    out = p.run("dvc", "repro")  # the front end a user reruns with; DVC deletes models/ptuning first
    assert "resuming from" in out.stdout + out.stderr
    assert p.executed()[0] == "train"
    resumed = load_file(str(p.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name
    assert not list(ckpts.glob("*/checkpoint-*.safetensors"))  # removed once the stage completed


def test_fp16_without_a_gpu_fails_at_once_with_a_clear_error(ran_project):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed")
    ran_project.set_param("train.precision", "fp16")
    proc = ran_project.run("ptune", "train", check=False)
    assert proc.returncode == 2 and "fp16 needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_quantization_without_a_gpu_fails_at_once_with_a_clear_error(ran_project):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: 4/8-bit loading is allowed")
    ran_project.set_param("train.quantization", "4bit")
    proc = ran_project.run("ptune", "train", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.quantization: 4bit needs a CUDA GPU" in proc.stderr and "set train.quantization: none" in proc.stderr
    assert "trainable parameters" not in proc.stderr  # refused before the base was loaded
    with pytest.raises(PtuneError, match="8bit needs a CUDA GPU"):
        check_quantization("8bit", "train.quantization")


def _tiny(arch: str, layers: int = 2):
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
    )
    if arch == "glm":
        return GlmForCausalLM(GlmConfig(head_dim=8, **common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


@pytest.mark.parametrize("arch", ["glm", "llama", "qwen2"])
def test_prefix_trains_and_generates_on_other_architectures(arch):
    model = _tiny(arch).eval()
    model.requires_grad_(False)
    encoder = PrefixEncoder(prefix_config_for(model, 4, True, 16, arch))
    optim = torch.optim.AdamW(encoder.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 128, (8, 12), generator=gen)
    ids[:, 6:] = ids[:, :6]  # learnable: the second half repeats the first
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :6] = -100
    losses = []
    for _ in range(30):
        loss = prefixed.forward(model, encoder, ids, mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    encoder.eval()
    new = prefixed.generate(
        model,
        encoder,
        ids[:2, :6],
        mask[:2, :6],
        {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None},
    )
    assert new.shape == (2, 4)


def test_prefix_of_another_length_is_refused_naming_both(tmp_path):
    model = _tiny("glm")
    PrefixEncoder(prefix_config_for(model, 8, False, 16, "glm")).save(tmp_path)
    with pytest.raises(PtuneError, match="pre_seq_len 8, but pre_seq_len 128 was asked for"):
        PrefixEncoder.load(tmp_path, model, pre_seq_len=128)
    # A config and weights from different runs: named, not a raw size-mismatch traceback.
    other = tmp_path / "other"
    PrefixEncoder(prefix_config_for(model, 4, False, 16, "glm")).save(other)
    (tmp_path / "prefix.safetensors").write_bytes((other / "prefix.safetensors").read_bytes())
    with pytest.raises(PtuneError, match="holds 4 virtual tokens, but .* says pre_seq_len 8"):
        PrefixEncoder.load(tmp_path, model)
