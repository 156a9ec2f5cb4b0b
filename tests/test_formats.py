"""Readers for every data format and the `huayu data inspect/convert` commands, on tiny fixtures."""

from __future__ import annotations

import gzip
import json

import pytest

from huayu.cli import main
from huayu.data.formats import (Dialogue, detect_format, dialogue_texts, open_text, read_dialogues,
                                read_texts)
from huayu.errors import DataError, HuayuError
from huayu.outputs import OUTPUT_RECORD

KDCONV = [
    {"name": "film one", "messages": [{"message": "知道这部电影吗？"},
                                      {"message": "知道呀，是爱情片。", "attrs": [{"name": "x"}]},
                                      {"message": "谁演的？"},
                                      {"message": "莱恩·高斯利。"}]},
    {"name": "film two", "messages": [{"message": "你好"}, {"message": "你好呀"}]},
]


def write(path, text: str):
    """Write a fixture, gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records: list):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def roles(dialogue: Dialogue) -> list[str]:
    return [m["role"] for m in dialogue.messages]


def data_error(excinfo) -> str:
    assert isinstance(excinfo.value, DataError)
    return str(excinfo.value)


# ---------------------------------------------------------------- eva


def test_eva_roles_alternate_back_from_the_reply(tmp_path):
    path = write(tmp_path / "train.txt.gz", "你好\t你好呀\n今天好热\t是啊\t开空调吧\n\n")
    result = read_dialogues(path)
    assert result.format == "eva" and result.skipped == 0
    assert [roles(d) for d in result.records] == [["user", "assistant"], ["assistant", "user", "assistant"]]
    assert result.records[1].messages[-1]["content"] == "开空调吧"
    assert result.records[1].source == f"{path}:line 2"


def test_eva_directory_reads_the_chosen_split(tmp_path):
    write(tmp_path / "train.txt", "a\tb\n")
    write(tmp_path / "valid.txt", "c\td\ne\tf\n")
    assert len(read_dialogues(tmp_path, split="valid").records) == 2
    with pytest.raises(DataError, match="no test.txt"):
        read_dialogues(tmp_path, split="test")


@pytest.mark.parametrize("text, where, reason, kept", [
    ("a\tb\n只有一句\n", "line 2", "needs at least 2 tab-separated turns", 1),
    ("a\tb\n\nc\td\n", "line 2", "blank line", 2),
    ("a\tb\nc\t\td\n", "line 2", "turn 2: empty text", 1),
])
def test_eva_bad_lines(tmp_path, text, where, reason, kept):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    assert data_error(excinfo).startswith(f"{path}: {where}: ") and reason in str(excinfo.value)
    result = read_dialogues(path, skip_invalid=True)
    assert (len(result.records), result.skipped) == (kept, 1)


# ---------------------------------------------------------------- conversation / sharegpt


def test_conversation_role_map_and_system(tmp_path):
    path = jsonl(tmp_path / "smile.jsonl.gz", [
        {"id": 1, "system": "你是咨询师", "conversation": [{"role": "client", "content": "我很焦虑"},
                                                        {"role": "counselor", "content": "慢慢说"}]},
        {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]},
    ])
    result = read_dialogues(path, role_map={"client": "user", "counselor": "assistant"})
    assert result.format == "conversation"
    assert [roles(d) for d in result.records] == [["system", "user", "assistant"], ["user", "assistant"]]


def test_conversation_unknown_role_suggests_role_map(tmp_path):
    path = jsonl(tmp_path / "smile.jsonl", [{"conversation": [{"role": "client", "content": "我很焦虑"},
                                                              {"role": "counselor", "content": "慢慢说"}]}])
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    message = data_error(excinfo)
    assert "smile.jsonl: line 1: turn 1: unknown role 'client'" in message and "--role-map" in message
    with pytest.raises(HuayuError, match="unknown roles"):
        read_dialogues(path, role_map={"client": "customer"})


def test_conversation_json_list_errors_name_the_record(tmp_path):
    path = write(tmp_path / "conv.json", json.dumps([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ]))
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    assert data_error(excinfo) == f"{path}: record 2: no assistant message"
    result = read_dialogues(path, skip_invalid=True)
    assert (len(result.records), result.skipped) == (1, 2)


def test_sharegpt_from_value_and_role_content(tmp_path):
    path = jsonl(tmp_path / "share.jsonl", [
        {"system": "be nice",
         "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
        {"conversations": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
    ])
    result = read_dialogues(path)
    assert result.format == "sharegpt"
    assert result.records[0].messages == [{"role": "system", "content": "be nice"},
                                          {"role": "user", "content": "你好"},
                                          {"role": "assistant", "content": "你好！"}]
    assert roles(result.records[1]) == ["user", "assistant"]


# ---------------------------------------------------------------- alpaca / columns


def test_alpaca_history_input_and_system(tmp_path):
    path = write(tmp_path / "alpaca.json", json.dumps([
        {"instruction": "翻译", "input": "hello", "output": "你好", "system": "你是翻译",
         "history": [["在吗", "在"], ["帮个忙", "好的"]]},
        {"instruction": "讲个笑话", "input": "", "output": "从前有座山"},
    ], ensure_ascii=False))
    first, second = read_dialogues(path).records
    assert roles(first) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert first.messages[-2:] == [{"role": "user", "content": "翻译\nhello"},
                                   {"role": "assistant", "content": "你好"}]
    assert second.messages[0]["content"] == "讲个笑话"


def test_alpaca_bad_output_names_the_field(tmp_path):
    path = write(tmp_path / "rm.json", json.dumps([{"instruction": "q", "output": ["chosen", "rejected"]}]))
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path, fmt="alpaca")
    assert data_error(excinfo) == f"{path}: record 1: output: expected text, got a list"


def test_prompt_response_columns(tmp_path):
    adgen = jsonl(tmp_path / "adgen.jsonl", [{"prompt": "类型#裤", "response": "宽松的阔腿裤"}])
    result = read_dialogues(adgen, prompt_column="prompt", response_column="response")
    assert result.format == "columns"
    assert result.records[0].messages == [{"role": "user", "content": "类型#裤"},
                                          {"role": "assistant", "content": "宽松的阔腿裤"}]
    summary = jsonl(tmp_path / "train.json", [{"content": "a"}, {"content": "b", "summary": "c"}])
    with pytest.raises(DataError, match=r"line 1: missing key 'summary'"):
        read_dialogues(summary, fmt="alpaca", prompt_column="content", response_column="summary")
    with pytest.raises(HuayuError, match="go together"):
        read_dialogues(adgen, prompt_column="prompt")


# ---------------------------------------------------------------- kdconv / chatterbot


def test_kdconv_expands_every_turn_with_window(tmp_path):
    path = write(tmp_path / "dev.json", json.dumps(KDCONV, ensure_ascii=False))
    result = read_dialogues(path)
    assert result.format == "kdconv"
    assert [d.source for d in result.records] == [f"{path}:dialogue 1 turn {t}" for t in (2, 3, 4)] + [
        f"{path}:dialogue 2 turn 2"]
    assert roles(result.records[2]) == ["user", "assistant", "user", "assistant"]
    windowed = read_dialogues(path, window=1).records
    assert [m["content"] for m in windowed[2].messages] == ["谁演的？", "莱恩·高斯利。"]
    assert roles(windowed[1]) == ["user", "assistant"]
    texts = list(dialogue_texts(result))
    assert texts == [m["message"] for d in KDCONV for m in d["messages"]]


def test_kdconv_bad_message_names_dialogue_and_turn(tmp_path):
    bad = [KDCONV[0], {"name": "x", "messages": [{"message": "hi"}, {"attrs": []}]}]
    path = write(tmp_path / "dev.json", json.dumps(bad, ensure_ascii=False))
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path, fmt="kdconv")
    assert data_error(excinfo) == f"{path}: dialogue 2: turn 2: expected text, got null"
    result = read_dialogues(path, fmt="kdconv", skip_invalid=True)
    assert (len(result.records), result.skipped) == (3, 1)


def test_chatterbot_yaml_keeps_scalars_as_written(tmp_path):
    path = write(tmp_path / "trivia.yml", "categories:\n- trivia\nconversations:\n"
                                          "- - 肯尼迪哪年遇刺?\n  - 1963\n"
                                          "- - 版本\n  - 3.10\n  - yes\n")
    first, second = read_dialogues(path).records
    assert first.messages[1]["content"] == "1963" and first.source == f"{path}:line 4"
    assert [m["content"] for m in second.messages] == ["版本", "3.10", "yes"]
    assert roles(second) == ["user", "assistant", "user"]


def test_chatterbot_bad_conversation_names_its_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "conversations:\n- - 你好\n  - 你好\n- - 只有一句\n")
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    assert data_error(excinfo) == f"{path}: line 4: needs at least 2 utterances"
    with pytest.raises(DataError, match="conversations"):
        read_dialogues(write(tmp_path / "empty.yml", "categories: [x]\n"))


# ---------------------------------------------------------------- detection and generic errors


@pytest.mark.parametrize("name, content, expected", [
    ("a.txt", "q\ta\n", "eva"),
    ("a.yml", "conversations:\n- [q, a]\n", "chatterbot"),
    ("a.jsonl", '{"conversation": []}\n', "conversation"),
    ("a.json.gz", '[{"messages": [{"role": "user", "content": "q"}]}]', "conversation"),
    ("a.json", '[{"conversations": []}]', "sharegpt"),
    ("a.jsonl", '{"instruction": "q", "output": "a"}\n', "alpaca"),
    ("a.json", json.dumps(KDCONV), "kdconv"),
    ("noext", '{"instruction": "q", "output": "a"}\n', "alpaca"),
])
def test_detect_format(tmp_path, name, content, expected):
    assert detect_format(write(tmp_path / name, content)) == expected


def test_detect_format_unknown_says_how_to_choose(tmp_path):
    with pytest.raises(DataError) as excinfo:
        detect_format(jsonl(tmp_path / "adgen.jsonl", [{"prompt": "p", "response": "r"}]))
    message = data_error(excinfo)
    assert "line 1" in message and "--format" in message and "--prompt-column prompt" in message
    assert detect_format(tmp_path) == "eva"


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dialogues(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file"):
        open_text(tmp_path / "nope.txt")
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    path = write(tmp_path / "broken.jsonl", good + '{"messages": [\n' + good)
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    assert data_error(excinfo).startswith(f"{path}: line 2: invalid JSON")
    result = read_dialogues(path, skip_invalid=True)
    assert (len(result.records), result.skipped, result.records[1].source) == (2, 1, f"{path}:line 3")
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        read_dialogues(write(tmp_path / "list.json", '[\n{"messages": }\n]'), fmt="conversation")


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a\tb\r\n".encode() + "café\tx\n".encode("latin-1"))
    with pytest.raises(DataError) as excinfo:
        read_dialogues(path)
    assert data_error(excinfo).startswith(f"{path}: line 2: not UTF-8 text")
    not_gzip = write(tmp_path / "corpus.txt.gz.tmp", "plain text").rename(tmp_path / "corpus.txt.gz")
    with pytest.raises(DataError, match=r"corpus.txt.gz: line 1: cannot read"):
        read_texts(not_gzip)


# ---------------------------------------------------------------- read_texts


def test_read_texts_plain_text_ignores_blank_lines(tmp_path):
    path = write(tmp_path / "corpus.txt.gz", "第一篇。\n\n第二篇。\n")
    result = read_texts(path)
    assert [(r.text, r.target, r.source) for r in result.records] == [
        ("第一篇。", None, f"{path}:line 1"), ("第二篇。", None, f"{path}:line 3")]


def test_read_texts_src_tgt_and_field_errors(tmp_path):
    path = jsonl(tmp_path / "seed.jsonl", [{"src_txt": "上联", "tgt_txt": "下联"}, {"src_txt": "续写"},
                                           {"src_txt": "", "tgt_txt": "x"}])
    with pytest.raises(DataError) as excinfo:
        read_texts(path)
    assert data_error(excinfo) == f"{path}: line 3: src_txt: empty text"
    result = read_texts(path, skip_invalid=True)
    assert [(r.text, r.target) for r in result.records] == [("上联", "下联"), ("续写", None)]
    assert result.skipped == 1
    with pytest.raises(DataError, match="--text-field"):
        read_texts(jsonl(tmp_path / "other.jsonl", [{"body": "x"}]))
    assert read_texts(tmp_path / "other.jsonl", text_field="body").records[0].text == "x"


def test_read_texts_directory_in_name_order(tmp_path):
    write(tmp_path / "b.txt", "二\n")
    jsonl(tmp_path / "a.jsonl.gz", [{"text": "一"}])
    write(tmp_path / "notes.md", "ignored\n")
    assert [r.text for r in read_texts(tmp_path).records] == ["一", "二"]


def test_text_directories_are_read_with_their_subdirectories_in_path_order(tmp_path, capsys):
    from huayu.data.sources import read_text_files

    write(tmp_path / "corpus" / "b" / "c.txt", "三\n")
    jsonl(tmp_path / "corpus" / "b" / "a" / "z.jsonl.gz", [{"text": "二"}])
    write(tmp_path / "corpus" / "a.txt", "一\n")
    write(tmp_path / "corpus" / ".cache" / "x.txt", "hidden\n")
    write(tmp_path / "corpus" / OUTPUT_RECORD, json.dumps({"command": "data convert"}))
    notes = []
    records = read_text_files([str(tmp_path / "corpus")], None, "tgt_txt", False, report=notes.append)
    assert [r.text for r in records] == ["一", "二", "三"]
    assert notes == [f"{tmp_path / 'corpus'}: 3 corpus files (subdirectories included)"]
    assert main(["data", "inspect", str(tmp_path / "corpus"), "--format", "text"]) == 0
    assert "3 corpus files" in capsys.readouterr().out
    write(tmp_path / "empty" / "sub" / "notes.md", "x\n")
    with pytest.raises(DataError, match=r"no \.txt/\.json/\.jsonl\(\.gz\) files in this directory or its subdir"):
        read_text_files([str(tmp_path / "empty")], None, "tgt_txt", False)


# ---------------------------------------------------------------- CLI


def test_cli_inspect_dialogues(tmp_path, capsys):
    path = write(tmp_path / "dev.json", json.dumps(KDCONV, ensure_ascii=False))
    assert main(["data", "inspect", str(path), "--window", "2", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: kdconv" in out and "dialogues: 4" in out and "turns per dialogue: min 2 / mean 2.5 / max 3" in out
    assert "user: 知道这部电影吗？" in out and "dialogue 1 turn 2" in out and "dialogue 1 turn 3" not in out


def test_cli_inspect_text_and_skip_invalid(tmp_path, capsys):
    path = jsonl(tmp_path / "seed.jsonl", [{"src_txt": "上联", "tgt_txt": "下联"}, {"src_txt": 3}])
    assert main(["data", "inspect", str(path), "--format", "text", "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "documents: 1" in out and "with target: 1" in out and "skipped (invalid): 1" in out


def test_cli_bad_file_exits_1_with_line_number(tmp_path, capsys):
    path = write(tmp_path / "bad.txt", "a\tb\n只有一句\n")
    assert main(["data", "inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"huayu data inspect: error: {path}: line 2: needs at least 2 tab-separated turns")
    assert main(["data", "convert", str(path), "--to", "eva", "--out", str(tmp_path / "out.txt")]) == 1
    assert "line 2" in capsys.readouterr().err and not (tmp_path / "out.txt").exists()


def test_cli_convert_kdconv_to_eva(tmp_path, capsys):
    path = write(tmp_path / "dev.json", json.dumps(KDCONV, ensure_ascii=False))
    out = tmp_path / "kd" / "test.txt"
    assert main(["data", "convert", str(path), "--to", "eva", "--window", "8", "--out", str(out)]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[2] == "知道这部电影吗？\t知道呀，是爱情片。\t谁演的？\t莱恩·高斯利。"
    assert [len(d.messages) for d in read_dialogues(out).records] == [2, 3, 4, 2]


def test_cli_convert_to_eva_flattens_and_merges(tmp_path, capsys):
    path = jsonl(tmp_path / "conv.jsonl", [{"system": "s", "messages": [
        {"role": "user", "content": "第一行\n第二行"}, {"role": "user", "content": "还在吗"},
        {"role": "assistant", "content": "在\t的"}, {"role": "user", "content": "谢谢"}]}])
    out = tmp_path / "out.txt"
    assert main(["data", "convert", str(path), "--to", "eva", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == "第一行 第二行 还在吗\t在 的\n"
    for note in ("2 turns had tabs/newlines replaced", "1 system turns dropped", "1 consecutive same-speaker",
                 "1 user turns after the last reply dropped"):
        assert note in report


def test_cli_convert_split_is_seeded_and_keeps_dialogues_together(tmp_path, capsys):
    dialogues = [{"name": str(n), "messages": [{"message": f"d{n} t{t}"} for t in range(3)]} for n in range(20)]
    path = write(tmp_path / "dev.json", json.dumps(dialogues))
    args = ["data", "convert", str(path), "--to", "conversation", "--split-ratio", "0.8,0.1,0.1", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "train.jsonl 32, valid.jsonl 4, test.jsonl 4" in capsys.readouterr().out
    parts = {}
    for name in ("train", "valid", "test"):
        text = (tmp_path / "a" / f"{name}.jsonl").read_text(encoding="utf-8")
        assert text == (tmp_path / "b" / f"{name}.jsonl").read_text(encoding="utf-8")
        parts[name] = {json.loads(line)["messages"][0]["content"][:3] for line in text.splitlines()}
    assert len(parts["train"] | parts["valid"] | parts["test"]) == 20
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["valid"])
    assert read_dialogues(tmp_path / "a" / "test.jsonl").format == "conversation"


def test_cli_convert_to_text_writes_each_dialogue_as_a_document(tmp_path):
    """--to text: a dialogue's turns on lines, one JSONL document per dialogue (pre-training input)."""
    path = tmp_path / "c.jsonl"
    write(path, json.dumps({"messages": [{"role": "user", "content": "你好"},
                                         {"role": "assistant", "content": "你好，请说。"}]}, ensure_ascii=False))
    assert main(["data", "convert", str(path), "--to", "text", "--out", str(tmp_path / "t.jsonl")]) == 0
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": "你好\n你好，请说。"}]


def test_cli_inspect_reports_the_share_of_unknown_tokens(tmp_path, tokenizer_dir, capsys):
    covered = write(tmp_path / "covered.txt", "你好\t你好，很高兴认识你。\n")
    assert main(["data", "inspect", str(covered), "--tokenizer", tokenizer_dir]) == 0
    out, err = capsys.readouterr()
    assert f"tokens ({tokenizer_dir}): 12\nunknown tokens (<unk>): 0 (0.00%)" in out and not err
    rare = write(tmp_path / "rare.txt", "你好\t你好，很高兴认识你。\n龘龘\t靐\n")  # 龘, 靐: not in the vocabulary
    assert main(["data", "inspect", str(rare), "--tokenizer", tokenizer_dir]) == 0
    out, err = capsys.readouterr()
    assert "unknown tokens (<unk>): 3 (20.00%)" in out
    assert err == ("warning: 20.00% of the tokens are <unk> (above 1%): the tokenizer cannot spell this data; "
                   "most common: '龘' 2, '靐' 1\n")
