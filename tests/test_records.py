"""Reading data as users have it: ADGEN's JSON lines with BOM, CRLF, blank lines or a GBK re-save; your own
JSON lines or CSV with named columns and multi-turn history; the prompt those turns render into."""

from __future__ import annotations

import json

import pytest

from ptune.data import readers as records
from ptune.data.prompts import PromptFormat, Turn, render_template
from ptune.errors import PtuneError

A = {"content": "类型#裙*颜色#红色", "summary": "红色的裙子，很好看。"}
B = {"content": "类型#上衣*风格#简约", "summary": "简约的上衣。"}


def _line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def test_bom_crlf_and_blank_lines_are_read(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(("\ufeff" + _line(A) + "\r\n\r\n   \r\n" + _line(B) + "\r\n").encode("utf-8"))
    assert records.read(path) == [A, B]


def test_duplicate_contents_are_kept_and_line_separators_inside_strings_survive(tmp_path):
    same = {"content": A["content"], "summary": "另一种说法\u2028第二行"}
    path = tmp_path / "train.json"
    path.write_text("\n".join(_line(x) for x in (A, same, A)) + "\n", encoding="utf-8")
    assert records.read(path) == [A, same, A]


def test_a_gbk_file_is_refused_naming_line_encoding_and_the_fix(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes((_line({"content": "a", "summary": "b"}) + "\n" + _line(A) + "\n").encode("gbk"))
    with pytest.raises(PtuneError) as err:
        records.read(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: not utf-8 text")
    assert "fetch_data.encoding: gbk" in message and f"iconv -f GB18030 -t UTF-8 {path}" in message


def test_a_gbk_file_reads_with_its_encoding_set(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes((_line(A) + "\r\n").encode("gbk"))
    assert records.read(path, encoding="gbk") == [A]


def test_an_unknown_encoding_is_named(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(_line(A), encoding="utf-8")
    with pytest.raises(PtuneError, match="fetch_data.encoding: 'klingon'"):
        records.read(path, encoding="klingon")


MULTI_TURN = [
    {"q": "推荐一件上衣", "a": "白色衬衫，简约百搭。", "turns": []},
    {"q": "有红色的吗", "a": "有，红色衬衫更显气色。", "turns": [["推荐一件上衣", "白色衬衫，简约百搭。"]]},
]
COLUMNS = records.Columns(prompt="q", response="a", history="turns")


def test_own_json_lines_with_history(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(_line(x) for x in MULTI_TURN), encoding="utf-8")
    # A data set with a history column keeps it on every row, empty ones included (ChatGLM-6B's format numbers
    # the rounds of every example of such a data set).
    assert records.read(path, COLUMNS) == [
        {"content": "推荐一件上衣", "summary": "白色衬衫，简约百搭。", "history": []},
        {
            "content": "有红色的吗",
            "summary": "有，红色衬衫更显气色。",
            "history": [["推荐一件上衣", "白色衬衫，简约百搭。"]],
        },
    ]


def test_own_csv_with_history_as_json_cells(tmp_path):
    import csv

    path = tmp_path / "chat.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["q", "a", "turns"])
        for x in MULTI_TURN:
            writer.writerow([x["q"], x["a"], json.dumps(x["turns"], ensure_ascii=False) if x["turns"] else ""])
    assert records.read(path, COLUMNS)[1]["history"] == [["推荐一件上衣", "白色衬衫，简约百搭。"]]


def test_a_csv_history_cell_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text("q,a,turns\n你好,您好,\n再见,再见,[oops\n", encoding="utf-8")
    with pytest.raises(PtuneError, match=r"chat.csv:3: column 'turns' is not a JSON list"):
        records.read(path, COLUMNS)


def test_csv_without_the_named_column_says_which(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text("question,answer\n你好,您好\n", encoding="utf-8")
    with pytest.raises(PtuneError, match=r"chat.csv:1: no column 'q', 'a'"):
        records.read(path, records.Columns("q", "a"))


@pytest.mark.parametrize(
    "turns, problem",
    [
        ('"not a list"', "must be a list of [question, answer] string pairs"),
        ('[["q", 3]]', "must be a list of [question, answer] string pairs"),
        ('[["only a question"]]', "must be a list of [question, answer] string pairs"),
    ],
)
def test_bad_history_is_named_with_file_line_and_column(tmp_path, turns, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(_line(MULTI_TURN[0]) + "\n" + f'{{"q": "x", "a": "y", "turns": {turns}}}\n', encoding="utf-8")
    with pytest.raises(PtuneError) as err:
        records.read(path, COLUMNS)
    assert str(err.value).startswith(f"{path}:2: column 'turns'") and problem in str(err.value)


CHATGLM2 = "{history}[Round {round}]\n\n问：{content}\n\n答："
TURN = "[Round {round}]\n\n问：{question}\n\n答：{answer}\n\n"


def format_prompt(template: str, content: str, history=None, history_template: str = "") -> str:
    return render_template(PromptFormat("template", template, history_template), Turn.of(content, history))


def test_history_renders_in_the_reference_chatglm_format():
    prompt = format_prompt(CHATGLM2, "第三问", [["第一问", "第一答"], ["第二问", "第二答"]], TURN)
    assert prompt == (
        "[Round 1]\n\n问：第一问\n\n答：第一答\n\n"
        "[Round 2]\n\n问：第二问\n\n答：第二答\n\n"
        "[Round 3]\n\n问：第三问\n\n答："
    )


def test_single_turn_prompts_are_as_before_and_values_are_not_reparsed():
    assert format_prompt("[Round 1]\n\n问：{content}\n\n答：", "类型#裙") == "[Round 1]\n\n问：类型#裙\n\n答："
    assert format_prompt("Q: {content} A:", "a {content} {round} {x}") == "Q: a {content} {round} {x} A:"
    # Without {history} in the template, earlier turns go first.
    assert (
        format_prompt("Q{round}: {content}\n", "b", [["a", "1"]], "Q{round}: {question}\n{answer}\n")
        == "Q1: a\n1\nQ2: b\n"
    )
