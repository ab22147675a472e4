"""The prompt seam, crossed with the user's commands: what `ptune preprocess` writes for a conversation, and what a
server or `ptune chat` started with `--log-prompts` says it sent to the model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

# Three turns: the third is answered after two earlier rounds.
QUESTIONS = ("类型#上衣*颜色#白色*风格#简约", "有红色的吗", "再写一句")
LOGGED = re.compile(r"ptune\.prompts INFO prompt (\{.*\})")

# (message, earlier rounds or None for a data set without a history column[, system message])
Conversation = tuple


def logged_prompts(text: str) -> list[list[int]]:
    """The prompt token ids a `--log-prompts` process logged, in order."""
    return [json.loads(m.group(1))["prompt_token_ids"] for m in LOGGED.finditer(text)]


def preprocessed_prompts(root: Path, work: Path, env: dict, conversations: list[Conversation]) -> list[list[int]]:
    """The dev prompt ids `ptune preprocess` builds for `conversations` ((message, earlier rounds or None)), with
    the params and models/base of the project in `root` (max_source_length raised: serving's budget is the
    model's context, and these prompts must not be cut)."""
    work.mkdir(parents=True)
    (work / "models").mkdir()
    (work / "models/base").symlink_to((root / "models/base").resolve())
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["preprocess"]["max_source_length"] = 400
    params["preprocess"]["max_target_length"] = 16
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    raw = work / "data/raw"
    raw.mkdir(parents=True)
    rows = []
    for content, history, *system in conversations:
        row = {"content": content, "summary": "好"}
        if history is not None:
            row["history"] = [list(pair) for pair in history]
        if system:
            row["system"] = system[0]
        rows.append(json.dumps(row, ensure_ascii=False))
    for split in ("train", "dev"):
        (raw / f"{split}.json").write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "ptune.cli", "preprocess"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from datasets import load_from_disk

    ids = load_from_disk(str(work / "data/processed"))["dev"]["input_ids"]
    shutil.rmtree(work / "data/processed")
    return [list(x) for x in ids]


def chat_three_turns(root: Path, env: dict, *flags: str) -> tuple[list[str], list[list[int]]]:
    """QUESTIONS typed into `ptune chat --log-prompts FLAGS` in a pseudo-terminal: its answers, and the prompt ids it
    logged."""
    import io

    import pexpect

    chat = pexpect.spawn(
        sys.executable,
        ["-m", "ptune.cli", "chat", "--log-prompts", *flags],
        cwd=str(root),
        env=env,
        encoding="utf-8",
        timeout=300,
    )
    chat.logfile_read = screen = io.StringIO()
    replies = []
    try:
        chat.expect_exact("You: ")
        for question in QUESTIONS:
            chat.sendline(question)
            chat.expect_exact("ptune: ")
            chat.expect_exact("\r\nYou: ")
            replies.append(chat.before.strip())
        chat.sendline("stop")
    finally:
        chat.close(force=True)
    return replies, logged_prompts(screen.getvalue())


def conversation(answers: list[str]) -> list[Conversation]:
    """The three turns of QUESTIONS as examples, after the rounds answered with `answers`."""
    return [
        (QUESTIONS[0], None),
        (QUESTIONS[1], [(QUESTIONS[0], answers[0])]),
        (QUESTIONS[2], [(QUESTIONS[0], answers[0]), (QUESTIONS[1], answers[1])]),
    ]


def three_turn_messages(answers: tuple[str, str]) -> list[dict]:
    """The OpenAI messages of the third turn, after two rounds answered with `answers`."""
    messages = []
    for question, answer in zip(QUESTIONS, answers):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": QUESTIONS[2]}]


def third_turn(answers: tuple[str, str]) -> Conversation:
    return QUESTIONS[2], list(zip(QUESTIONS[:2], answers))
