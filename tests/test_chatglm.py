"""The chatglm backend: ChatGLM-6B's own remote code in the legacy environment, through the stage commands.

The model is tiny and random but real remote code: the snapshot's configuration/modeling/tokenization_chatglm.py,
a shrunken config and a sentencepiece model trained in the test (tests/support/chatglm_tiny.py). The legacy environment
(.venv-legacy) is created on first use, as it is for a user; `make test` creates it before pytest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from ptune.model import legacy_env

from conftest import REPO, TINY_PARAMS, Project, make_project

SNAPSHOT = REPO.parent / "shared" / "chatglm-6b-snapshot"
PROMPT = "类型#上衣*颜色#白色*风格#简约*衣样式#衬衫"

pytestmark = pytest.mark.skipif(
    not (SNAPSHOT / "modeling_chatglm.py").is_file(), reason=f"the ChatGLM-6B snapshot is not at {SNAPSHOT}"
)


@pytest.fixture(scope="session")
def legacy_python() -> str:
    return str(legacy_env.ensure())


@pytest.fixture(scope="session")
def tiny_chatglm(tmp_path_factory, legacy_python, env):
    out = tmp_path_factory.mktemp("tiny-chatglm")
    script = REPO / "tests" / "support" / "chatglm_tiny.py"
    subprocess.run([legacy_python, str(script), str(out), str(SNAPSHOT)], check=True, env=env, capture_output=True)
    return out


def chatglm_params(model_dir) -> dict:
    """The tiny params with the chatglm backend on the tiny model, the reference's raw prompt, and sampling (the
    random model answers greedy decoding with special tokens only, which decode to nothing)."""
    raw = yaml.safe_load(TINY_PARAMS.read_text(encoding="utf-8"))
    # ChatGLM-6B runs its own code and ships pickles only (as the tiny model does): both opt-ins are needed.
    raw["fetch_weights"].update(
        source="path", backend="chatglm", path=str(model_dir), trust_remote_code=True, allow_pickle=True
    )
    # ChatGLM-6B's own prompt format, as the preset has it (the raw content for single-turn data).
    raw["preprocess"]["prompt_format"] = "chatglm6b"
    for key in ("prompt_template", "history_template", "system"):
        raw["preprocess"].pop(key)
    raw["evaluate"]["do_sample"] = True
    return raw


@pytest.fixture(scope="session")
def chatglm_run(tmp_path_factory, env, tiny_chatglm):
    """The tiny pipeline on the chatglm backend, run once by `dvc repro`; do not modify it."""
    root = tmp_path_factory.mktemp("chatglm") / "project"
    params = root.parent / "params.yaml"
    params.write_text(yaml.safe_dump(chatglm_params(tiny_chatglm), allow_unicode=True), encoding="utf-8")
    project = make_project(root, env, params=params)
    project.run("dvc", "repro")
    return project


# The reference trainer saves a checkpoint with save_pretrained and only the trainable (prefix) parameters; here with
# the projection MLP and pre_seq_len 6, which a loader must read from the tensors.
REFERENCE_CHECKPOINT = """
import torch
from transformers import AutoConfig, AutoModel

def reference_model(pre_seq_len, projection):
    config = AutoConfig.from_pretrained("models/base", trust_remote_code=True)
    config.pre_seq_len, config.prefix_projection = pre_seq_len, projection
    return AutoModel.from_pretrained("models/base", config=config, trust_remote_code=True).float()

trained = reference_model(6, True)
torch.manual_seed(1)
for p in trained.transformer.prefix_encoder.parameters():
    p.data.normal_()
trainable = {n: p for n, p in trained.named_parameters() if n.startswith("transformer.prefix_encoder.")}
trained.save_pretrained("checkpoint-3000", state_dict=trainable)
"""


def run_legacy(project, python: str, code: str) -> dict:
    """Run `code` in the legacy environment in the project; it prints one JSON line, returned."""
    proc = subprocess.run(
        [python, "-c", code], cwd=project.root, env=project.env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_stage_runs_and_the_model_stages_run_in_the_legacy_environment(chatglm_run):
    executed = chatglm_run.executed()
    assert sorted(executed) == sorted(
        ("fetch_weights", "fetch_data", "preprocess", "train", "evaluate", "deploy", "report")
    )
    train = json.loads((chatglm_run.root / "reports/timings/train.json").read_text())
    assert train["backend"] == "chatglm" and train["transformers"].startswith("4.33")
    assert train["trainable_parameters"] == 4 * 2 * 2 * 32  # pre_seq_len x k/v x layers x hidden
    import transformers  # this test process: the main environment keeps transformers 5

    assert transformers.__version__.startswith("5.")
    source = json.loads((chatglm_run.root / "models/base/ptune_source.json").read_text())
    assert source["backend"] == "chatglm"


def test_inputs_are_built_as_the_reference_builds_them(chatglm_run, legacy_python):
    got = run_legacy(
        chatglm_run,
        legacy_python,
        """
import json
from datasets import load_from_disk
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("models/base", trust_remote_code=True)
d = load_from_disk("data/processed")
train, dev = d["train"][0], d["dev"][0]
print(json.dumps({"train": train, "dev": dev, "gmask": tok.gmask_token_id, "bos": tok.bos_token_id,
                  "eos": tok.eos_token_id}))
""",
    )
    ids, labels = got["train"]["input_ids"], got["train"]["labels"]
    sop = ids.index(got["bos"])
    assert ids[sop - 1] == got["gmask"] and ids[-1] == got["eos"]  # prompt [gMASK] <sop> target <eop>
    assert labels[:sop] == [-100] * sop and labels[sop:] == ids[sop:]  # <sop> on is learned
    assert len(ids[: sop - 1]) <= 48 - 1 and len(ids[sop + 1 : -1]) <= 24 - 2  # the reference's cuts
    assert got["dev"]["input_ids"][-2:] == [got["gmask"], got["bos"]] and len(got["dev"]["input_ids"]) <= 48
    # The reference decodes labels without special tokens, and [gMASK] is not one for this tokenizer.
    assert got["dev"]["label"].endswith("[gMASK]")


def test_prefix_is_saved_as_the_reference_checkpoint_format_both_ways(chatglm_run, legacy_python):
    root = chatglm_run.root
    saved = torch.load(root / "models/ptuning/pytorch_model.bin", weights_only=True)
    assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]
    assert saved["transformer.prefix_encoder.embedding.weight"].shape == (4, 2 * 2 * 32)
    assert saved["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    assert json.loads((root / "models/ptuning/prefix_config.json").read_text())["pre_seq_len"] == 4
    # What ptune itself reads: the same tensors as safetensors, never the pickle.
    from safetensors.torch import load_file

    assert set(load_file(root / "models/ptuning/model.safetensors")) == set(saved)
    got = run_legacy(
        chatglm_run,
        legacy_python,
        REFERENCE_CHECKPOINT
        + """
import json, os
from pathlib import Path
from ptune.model.chatglm import ChatGLMBackend, prefix_off
ChatGLM = ChatGLMBackend()

# Ours into the reference web demo: it loads pytorch_model.bin, strips the key prefix, loads the prefix encoder.
web_demo = reference_model(4, False)
state = torch.load("models/ptuning/pytorch_model.bin")
key = "transformer.prefix_encoder."
web_demo.transformer.prefix_encoder.load_state_dict({k[len(key):]: v for k, v in state.items() if k.startswith(key)})
ours, prefix = ChatGLM.load_for_inference(Path("models/base"), Path("models/ptuning"), torch.device("cpu"))
same = torch.equal(web_demo.transformer.prefix_encoder.embedding.weight, prefix.embedding.weight)
tok = ChatGLM.load_tokenizer(Path("models/base"))
ids = torch.tensor([ChatGLM.encode_text(tok, "类型#上衣*颜色#白色") + ChatGLM.prompt_specials(tok)])
with torch.no_grad():
    with_prefix = ours(input_ids=ids).logits[0, -1]
    with prefix_off(ours):
        without = ours(input_ids=ids).logits[0, -1]

# The reference checkpoint made above into ours: a pickle, read only when params allow pickles.
try:
    ChatGLM.load_for_inference(Path("models/base"), Path("checkpoint-3000"), torch.device("cpu"))
    refused = ""
except Exception as exc:
    refused = str(exc)
loaded, loaded_prefix = ChatGLM.load_for_inference(Path("models/base"), Path("checkpoint-3000"), torch.device("cpu"),
                                                   allow_pickle=True)
print(json.dumps({
    "pickle_refused": refused,
    "web_demo_equal": same,
    "prefix_reaches_the_model": float((with_prefix - without).abs().max()),
    "checkpoint_files": sorted(os.listdir("checkpoint-3000")),
    "checkpoint_equal": all(torch.equal(p, trainable["transformer.prefix_encoder." + n])
                            for n, p in loaded_prefix.named_parameters()),
    "checkpoint_pre_seq_len": loaded.transformer.pre_seq_len,
    "checkpoint_projection": loaded.config.prefix_projection,
}))
""",
    )
    assert got["web_demo_equal"] and got["prefix_reaches_the_model"] > 0
    assert "pytorch_model.bin" in got["checkpoint_files"]
    assert "fetch_weights.allow_pickle: true" in got["pickle_refused"]
    assert got["checkpoint_equal"] and got["checkpoint_pre_seq_len"] == 6 and got["checkpoint_projection"]


@pytest.mark.slow
def test_a_reference_checkpoint_is_evaluated_and_served_in_place_of_ours(chatglm_run, legacy_python, tmp_path):
    project = Project(tmp_path / "project", chatglm_run.env)
    shutil.copytree(chatglm_run.root, project.root, symlinks=True)
    run_legacy(project, legacy_python, REFERENCE_CHECKPOINT + "print('{}')")
    shutil.rmtree(project.root / "models/ptuning")
    shutil.copytree(project.root / "checkpoint-3000", project.root / "models/ptuning")
    project.run("dvc", "commit", "-f", "train")  # as docs/chatglm6b.md says: the checkpoint becomes train's output
    project.clear_log()
    project.run("dvc", "repro")
    assert project.executed() == ["evaluate", "deploy", "report"]
    bundle = project.root / "models/deploy"
    assert (bundle / "prefix/pytorch_model.bin").is_file()
    assert (bundle / "prefix/model.safetensors").is_file()  # the bundle is served without unpickling
    assert "pre_seq_len 6" in (bundle / "README.md").read_text()
    assert "answer" in json.loads((project.root / "reports/deploy_check.json").read_text())


def test_evaluation_deploy_and_report(chatglm_run, env):
    root = chatglm_run.root
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["n_examples"] == 6 and set(metrics["ptuned"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    rows = [json.loads(line) for line in (root / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and any(r["ptuned"] for r in rows)  # sampled text, decoded
    bundle = json.loads((root / "models/deploy/bundle.json").read_text())
    assert bundle["backend"] == "chatglm" and bundle["prompt"]["kind"] == "chatglm6b"
    assert (root / "models/deploy/prefix/pytorch_model.bin").is_file()
    assert "prompt" in json.loads((root / "reports/deploy_check.json").read_text())
    # Serving from the main environment switches to the legacy one by itself.
    proc = chatglm_run.run("python", "-m", "ptune.bundle", "models/deploy", PROMPT)
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"answer", "latency_s"} <= set(answer)
    assert "| P-tuned |" in (root / "reports/report.md").read_text()


# The snapshot's own model.chat, run on the tiny model: the ids it hands to generate() are the outside truth.
MODEL_CHAT = """
import json
from pathlib import Path
from transformers import AutoModel
from ptune.data import prompts
from ptune.model.chatglm import ChatGLMBackend
ChatGLM = ChatGLMBackend()

tok = ChatGLM.load_tokenizer(Path("models/base"))
model = AutoModel.from_pretrained("models/base", trust_remote_code=True).float()
seen, generate = [], model.generate
def watched(**kwargs):
    seen.append(kwargs["input_ids"][0].tolist())
    return generate(**kwargs)
model.generate = watched
rounds = [("类型#上衣*颜色#白色", "白色上衣。"), ("有红色的吗", "有。")]
cases = [("再写一句", rounds), ("类型#裙*长度#短", [])]
prompter = prompts.Prompter(prompts.PromptFormat("chatglm6b"), tok, ChatGLM)
ours = [prompter.fit(prompts.Turn.of(query, history), 10**6, chat=True)[0] for query, history in cases]
for query, history in cases:
    model.chat(tok, query, history=history, max_new_tokens=1)
print(json.dumps({"model_chat": seen, "ours": ours}))
"""


def test_prompts_are_the_ones_model_chat_builds(chatglm_run, legacy_python):
    got = run_legacy(chatglm_run, legacy_python, MODEL_CHAT)
    assert got["ours"] == got["model_chat"]  # [Round i] from 0 with history, the query alone without


def test_every_serving_path_sends_the_prompts_of_training(chatglm_run, tmp_path):
    """POST /, OpenAI messages and `ptune chat` (all in the legacy environment) send the model, for a three-turn
    conversation and a first message, the token ids `ptune preprocess` writes for those examples."""
    from ptune.serve.process import ApiProcess

    from support.prompt_seam import (
        QUESTIONS,
        chat_three_turns,
        conversation,
        logged_prompts,
        preprocessed_prompts,
        third_turn,
        three_turn_messages,
    )

    answers = ("白色衬衫，简约百搭。", "有，红色更显气色。")
    root = chatglm_run.root
    with ApiProcess(
        ["--bundle", "models/deploy", "--log-prompts", "--max-new-tokens", "2"],
        cwd=root,
        env=chatglm_run.env,
        start_timeout=300,
    ) as api:
        api.post("/", {"prompt": QUESTIONS[2], "history": [list(p) for p in third_turn(answers)[1]]})
        api.post("/v1/chat/completions", {"model": "ptune", "messages": three_turn_messages(answers)})
        api.post("/", {"prompt": QUESTIONS[0]})
        sent = logged_prompts(api.output())
    replies, said = chat_three_turns(root, chatglm_run.env, "--max-new-tokens", "2")
    trained = preprocessed_prompts(
        root,
        tmp_path / "preprocess",
        chatglm_run.env,
        [third_turn(answers), third_turn(answers), (QUESTIONS[0], None), *conversation(replies)],
    )
    assert sent + said == trained


def test_quantization_on_a_cpu_fails_at_once_naming_the_keys(chatglm_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project = Project(tmp_path / "project", chatglm_run.env)
    shutil.copytree(chatglm_run.root, project.root, symlinks=True)
    project.set_param("train.quantization", "4bit")
    proc = project.run("ptune", "train", check=False)
    assert proc.returncode == 2 and "train.quantization: 4bit needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
    project.set_param("train.quantization", "none")
    project.set_param("train.devices", 2)
    proc = project.run("ptune", "train", check=False)
    assert proc.returncode == 2 and "set train.devices: 1" in proc.stderr


def test_remote_code_and_pickles_need_their_opt_ins(tmp_path, env, tiny_chatglm):
    raw = chatglm_params(tiny_chatglm)
    raw["fetch_weights"].update(trust_remote_code=False, allow_pickle=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    project = make_project(tmp_path / "project", env, params=params)
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "fetch_weights.trust_remote_code is false" in proc.stderr
    assert "modeling_chatglm.py" in proc.stderr and not (project.root / "models/base").exists()
    project.set_param("fetch_weights.trust_remote_code", True)
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "only as pickles (pytorch_model.bin)" in proc.stderr
    assert "fetch_weights.allow_pickle: true" in proc.stderr and not (project.root / "models/base").exists()
    # A models/base that does not record the opt-in (made before it, or by hand) is not trusted either.
    project.set_param("fetch_weights.allow_pickle", True)
    project.run("ptune", "fetch_weights")
    record = project.root / "models/base/ptune_source.json"
    assert json.loads(record.read_text())["trust_remote_code"] is True
    record.write_text(json.dumps({"source": "path", "backend": "chatglm"}))
    proc = project.run("ptune", "preprocess", check=False)  # it loads the tokenizer before reading any data
    assert proc.returncode == 2 and "does not record fetch_weights.trust_remote_code: true" in proc.stderr


def test_backend_must_fit_the_model(tmp_path, env, tiny_chatglm):
    raw = chatglm_params(tiny_chatglm)
    raw["fetch_weights"]["backend"] = "transformers"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    project = make_project(tmp_path / "project", env, params=params)
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "set fetch_weights.backend: chatglm" in proc.stderr
    project.set_param("fetch_weights.backend", "chatglm")
    project.set_param("fetch_weights.source", "embedded")
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "the embedded model is a transformers-native GLM" in proc.stderr
    assert not (project.root / "models/base").exists()


# Slow: a check of bench/legacy_gpu.py, not of the pipeline.
@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_dry_run_on_transformers_5():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "legacy_gpu.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["precision"].split()[0], r["gradient_checkpointing"]) for r in result["results"]] == [
        ("fp16", False),
        ("fp16", True),
        ("int4", False),
        ("int4", True),
    ]
