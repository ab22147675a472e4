"""Prompt formats (ptune.data.prompts): the presets' chat models get the prompts their own chat templates make, and
every serving path sends the model, for a conversation, the token ids `ptune preprocess` trained the prefix on."""

from __future__ import annotations

import pytest
import yaml

from ptune.data import prompts
from ptune.errors import PtuneError

from conftest import REPO, Project
from support import chat_models
from support.prompt_seam import (
    QUESTIONS,
    chat_three_turns,
    conversation,
    logged_prompts,
    preprocessed_prompts,
    third_turn,
    three_turn_messages,
)

ANSWERS = ("白色衬衫，简约百搭。", "有，红色更显气色。")
SYSTEM = "你是一位广告文案写手。"


@pytest.fixture(scope="module", params=sorted(chat_models.PRESETS))
def chat_project(request, tmp_path_factory, env) -> Project:
    """A project on the preset's params whose models/base is the preset's stand-in chat model."""
    root = tmp_path_factory.mktemp(request.param) / "project"
    chat_models.build(root / "models/base", request.param)
    params = yaml.safe_load((REPO / "presets" / f"{request.param}.yaml").read_text(encoding="utf-8"))
    params["deploy"].update(max_new_tokens=4, do_sample=False)  # what `serve --model` answers with
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    project = Project(root, env)
    project.preset = request.param
    return project


def _prompter(project: Project) -> prompts.Prompter:
    """The prompt builder preprocess, evaluate and deploy build from the preset's params and the stand-in base."""
    from ptune import config
    from ptune.model import prompting

    raw = yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))["preprocess"]
    assert raw["prompt_format"] == "chat_template" and "prompt_template" not in raw  # no hand-copied template
    return prompting.for_base(config.load(project.root / "params.yaml").preprocess, project.root / "models/base")


def test_prompts_are_the_chat_templates_own(chat_project):
    """Golden: the ids tokenizer.apply_chat_template(..., tokenize=True) gives for the real template."""
    prompter = _prompter(chat_project)
    tok = prompter.tokenizer
    turns = [
        prompts.Turn.of(QUESTIONS[0]),
        prompts.Turn.of(*third_turn(ANSWERS)),
        prompts.Turn.of(*third_turn(ANSWERS), system=SYSTEM),
    ]
    for turn in turns:
        truth = tok.apply_chat_template(
            prompter.messages(turn), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert prompter.ids(turn) == truth
    text = prompter.text(turns[1])
    if chat_project.preset == "glm4-9b-chat":
        # One [gMASK]<sop> at the start, each round as <|user|> / <|assistant|> (the old hand-copied template
        # repeated [gMASK]<sop> in every round when serving).
        assert text == (
            "[gMASK]<sop><|user|>\n类型#上衣*颜色#白色*风格#简约<|assistant|>\n白色衬衫，简约百搭。"
            "<|user|>\n有红色的吗<|assistant|>\n有，红色更显气色。<|user|>\n再写一句<|assistant|>"
        )
        assert prompter.answer_text("好") == "\n好"  # the template's newline after <|assistant|> is trained on
        assert tok.convert_ids_to_tokens(prompter.end_of_turn) == "<|endoftext|>"
    else:
        # Qwen's default system message once, every answer closed by <|im_end|> (the old template dropped it).
        assert text.count("<|im_start|>system\nYou are Qwen") == 1
        assert "有，红色更显气色。<|im_end|>\n<|im_start|>user\n再写一句<|im_end|>\n<|im_start|>assistant\n" in text
        assert prompter.answer_text("好") == "好"
        assert tok.convert_ids_to_tokens(prompter.end_of_turn) == "<|im_end|>"
    # Generation stops on the end of turn, EOS and what the model's generation_config.json names.
    stop_names = chat_models.PRESETS[chat_project.preset]["stop"]
    stops = prompter.stop_ids(tok.convert_tokens_to_ids(stop_names))
    assert set(tok.convert_ids_to_tokens(stops)) == set(stop_names)


def _web_page_conversation(project: Project, caplog) -> tuple[list[str], list[list[int]]]:
    """Three turns through the web page's own call into the engine (ptune.serve.web.answer, what the page's Send
    runs), on the model `serve web --model models/base` loads: the answers and the prompts it logged."""
    import logging

    from ptune import config
    from ptune.serve import web
    from ptune.serve.engine import Engine

    params = config.load(project.root / "params.yaml")
    engine = Engine.from_model(str(project.root / "models/base"), params.preprocess, params.deploy)
    engine.log_prompts = True
    d = engine.defaults
    pairs: list = []
    with caplog.at_level(logging.INFO, logger="ptune.prompts"):
        for question in QUESTIONS:
            for pairs, _ in web.answer(
                engine, pairs + [[question, None]], d.max_new_tokens, d.do_sample, d.top_p, d.temperature, ""
            ):
                pass
    logged = "\n".join(f"ptune.prompts INFO {r.getMessage()}" for r in caplog.records if r.name == "ptune.prompts")
    return [a for _, a in pairs], logged_prompts(logged)


def test_every_serving_path_sends_the_prompts_of_training(chat_project, tmp_path, caplog):
    """`ptune serve api --model` (POST / and OpenAI messages, a system message included), `ptune chat --model` and
    the web page's call into the engine send, for three turns, the token ids `ptune preprocess` writes for those
    examples."""
    from ptune.serve.process import ApiProcess

    root = chat_project.root
    with ApiProcess(
        ["--model", "models/base", "--log-prompts"], cwd=root, env=chat_project.env, start_timeout=300
    ) as api:
        api.post("/", {"prompt": QUESTIONS[2], "history": [list(p) for p in third_turn(ANSWERS)[1]]})
        api.post("/v1/chat/completions", {"model": "base", "messages": three_turn_messages(ANSWERS)})
        api.post(
            "/v1/chat/completions",
            {"model": "base", "messages": [{"role": "system", "content": SYSTEM}, *three_turn_messages(ANSWERS)]},
        )
        sent = logged_prompts(api.output())
    replies, said = chat_three_turns(root, chat_project.env, "--model", "models/base")
    page_answers, page = _web_page_conversation(chat_project, caplog)

    trained = preprocessed_prompts(
        root,
        tmp_path / "preprocess",
        chat_project.env,
        [
            third_turn(ANSWERS),
            third_turn(ANSWERS),
            (*third_turn(ANSWERS), SYSTEM),
            *conversation(replies),
            *conversation(page_answers),
        ],
    )
    assert sent + said + page == trained


def test_rounds_are_dropped_oldest_first_and_data_cut_only_at_the_content(chat_project):
    prompter = _prompter(chat_project)
    turn = prompts.Turn.of(*third_turn(ANSWERS))
    whole = prompter.ids(turn)
    ids, kept = prompter.fit(turn, len(whole) - 1)
    assert kept == 1 and ids == prompter.ids(prompts.Turn.of(QUESTIONS[2], third_turn(ANSWERS)[1][1:]))
    alone = prompter.ids(prompts.Turn.of(QUESTIONS[2], []))
    with pytest.raises(prompts.TooLong):  # serving refuses a message that alone does not fit
        prompter.fit(turn, len(alone) - 1)
    cut, kept = prompter.fit(turn, len(alone) - 1, cut=True)  # data keep the format and cut the content
    assert kept == 0 and len(cut) == len(alone) - 1
    assert cut[:3] == alone[:3] and cut[-1] == alone[-1]  # the template's start and its generation prompt kept


def test_format_and_params_that_cannot_work_are_named():
    from ptune.config import PreprocessConfig, check_prompt_format

    with pytest.raises(PtuneError, match="preprocess.prompt_template: not used with prompt_format: chat_template"):
        check_prompt_format(PreprocessConfig(64, 64, None, "chat_template", "{content}"))
    with pytest.raises(PtuneError, match="preprocess.system: ChatGLM-6B's format has no system message"):
        check_prompt_format(PreprocessConfig(64, 64, None, "chatglm6b", system="be brief"))
    with pytest.raises(PtuneError, match="carries no chat template"):
        prompts.format_for(PreprocessConfig(64, 64, None, "chat_template"), object(), True)


def test_chatglm6b_text_follows_model_chat_and_the_reference_script():
    assert prompts.render_chatglm6b(prompts.Turn.of("q")) == "q"  # no history column: the query alone
    assert prompts.render_chatglm6b(prompts.Turn.of("q", [])) == "[Round 0]\n问：q\n答："  # ptuning/main.py
    assert (
        prompts.render_chatglm6b(prompts.Turn.of("q", [("a", "b")]))
        == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："
    )
