"""Tool-calling data: sharegpt's function_call/observation turns (the shared glaive file) and OpenAI's
tool_calls/tool messages read into one form, bad records named, and `huayu sft` training on them."""

import json
import re
from pathlib import Path

import pytest

from huayu.data.formats import dialogue_texts, read_dialogues
from huayu.errors import DataError

GLAIVE = Path(__file__).parents[2] / "shared" / "data" / "instruct" / "glaive_toolcall_zh_demo.json"
CALC = {"name": "calc", "description": "算", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}
OPENAI_CALC = {"type": "function", "function": CALC}


def write(path, records) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.skipif(not GLAIVE.exists(), reason="the shared glaive demo file is not in this checkout")
def test_the_glaive_file_reads_into_calls_results_and_tools():
    result = read_dialogues(GLAIVE)
    assert (result.format, len(result.records), result.skipped) == ("sharegpt", 300, 0)
    first = result.records[0].messages
    assert [m["role"] for m in first] == ["user", "assistant", "tool", "assistant"]
    assert [t["function"]["name"] for t in first[0]["tools"]] == ["generate_invoice", "generate_password"]
    assert first[1] == {"role": "assistant", "content": "", "tool_calls": [{"name": "generate_invoice", "arguments": {
        "customer_name": "约翰·多伊", "items": [{"name": "苹果", "quantity": 2, "price": 1},
                                             {"name": "香蕉", "quantity": 3, "price": 0.5}]}}]}
    assert first[2]["content"].startswith('{"invoice_id": "INV12345"')
    assert sum("tools" in d.messages[0] for d in result.records) == 200  # 100 records list no tools ("[]")
    assert sum(len(m.get("tool_calls", [])) for d in result.records for m in d.messages) == 216


def test_sharegpt_tools_as_a_list_and_parallel_calls(tmp_path):
    record = {"conversations": [{"from": "human", "value": "问"},
                                {"from": "function_call", "value": json.dumps([{"name": "calc", "arguments": {"x": "1"}},
                                                                               {"name": "calc", "arguments": {"x": "2"}}])},
                                {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
                                {"from": "gpt", "value": "答"}], "tools": [CALC], "system": "系统"}
    (dialogue,) = read_dialogues(write(tmp_path / "d.jsonl", [record])).records
    assert dialogue.messages[0] == {"role": "system", "content": "系统", "tools": [OPENAI_CALC]}
    assert [c["arguments"]["x"] for c in dialogue.messages[2]["tool_calls"]] == ["1", "2"]
    assert [m["role"] for m in dialogue.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]


def test_openai_messages_with_tool_calls(tmp_path):
    call = {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"x": "1+1"}'}}
    record = {"messages": [{"role": "user", "content": "问"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "2"},
                           {"role": "assistant", "content": "答"}], "tools": [OPENAI_CALC]}
    (dialogue,) = read_dialogues(write(tmp_path / "d.jsonl", [record])).records
    assert dialogue.messages == [{"role": "user", "content": "问", "tools": [OPENAI_CALC]},
                                 {"role": "assistant", "content": "", "tool_calls": [{"name": "calc",
                                                                                      "arguments": {"x": "1+1"}}]},
                                 {"role": "tool", "content": "2"}, {"role": "assistant", "content": "答"}]
    texts = list(dialogue_texts(read_dialogues(write(tmp_path / "d.jsonl", [record]))))
    assert json.dumps(OPENAI_CALC, ensure_ascii=False) in texts and '{"name": "calc", "arguments": {"x": "1+1"}}' in texts


def test_huayus_own_form_reads_back(tmp_path):
    """What huayu holds (tools on the first message, GLM-4's way) is a conversation record too."""
    messages = [{"role": "user", "content": "问", "tools": [OPENAI_CALC]},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": {"x": "1"}}]},
                {"role": "tool", "content": "1"}, {"role": "assistant", "content": "答"}]
    (dialogue,) = read_dialogues(write(tmp_path / "d.jsonl", [{"messages": messages}])).records
    assert dialogue.messages == messages


def turns(*middle):
    return {"conversations": [{"from": "human", "value": "问"}, *middle, {"from": "gpt", "value": "答"}]}


BAD = [
    (turns({"from": "function_call", "value": "calc(1)"}),
     "turn 2: a function_call turn must hold a call's JSON: Expecting value"),
    (turns({"from": "function_call", "value": '{"arguments": {}}'}), "turn 2: tool call name None"),
    (turns({"from": "function_call", "value": '{"name": "calc", "arguments": [1]}'}),
     "turn 2: call of calc: the arguments must be a JSON object"),
    (turns({"from": "function_call", "value": '{"name": "calc", "arguments": "{bad"}'}),
     "turn 2: call of calc: the arguments are not JSON"),
    ({"conversations": [{"from": "human", "value": "问"}, {"from": "observation", "value": "1"},
                        {"from": "gpt", "value": "答"}]}, "turn 2: a tool result must answer an assistant turn"),
    ({**turns(), "tools": "[{bad"}, "tools: not a JSON list of tools"),
    ({**turns(), "tools": [{"description": "no name"}]}, "tools: tool name None"),
    ({**turns(), "tools": [{"type": "retrieval"}]}, "tools: tool type 'retrieval': only function tools"),
    ({**turns(), "tools": [CALC, CALC]}, "tools: two tools share a name: calc"),
    ({**turns(), "tools": [{**CALC, "parameters": "x"}]}, "tools: tool calc: the parameters must be a JSON schema"),
    ({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": None,
                                                      "tool_calls": [{"type": "function", "function": {"name": "a b"}}]}]},
     "turn 2: tool call name 'a b': expected 1 to 64 letters"),
    ({"messages": [{"role": "user", "content": "问", "tools": [CALC]}], "tools": [CALC]},
     "tools given twice: tools and turn 1 tools"),
]


@pytest.mark.parametrize("record, reason", BAD)
def test_bad_tool_records_are_named(tmp_path, record, reason):
    path = write(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError, match="d.jsonl: line 1: " + re.escape(reason)):
        read_dialogues(path)
    assert read_dialogues(path, skip_invalid=True).skipped == 1


def test_sft_trains_on_tool_calls(tmp_path, tiny_model_dir):
    """`huayu sft` on sharegpt tool data: the call's argument is learned, the result is not."""
    from transformers import AutoTokenizer

    from huayu.cli import main
    from huayu.data.chat import encode_dialogue
    from huayu.data.templates import DEFAULT_CHAT_TEMPLATE

    record = turns({"from": "function_call", "value": '{"name": "calc", "arguments": {"x": "你好"}}'},
                   {"from": "observation", "value": "晚安"})
    data = write(tmp_path / "tools.jsonl", [{**record, "tools": [CALC]}] * 4)
    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir, "--data", data, "--template", "huayu", "--max-steps", "1",
                 "--batch-size", "2", "--no-cache", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    example = encode_dialogue(tok, read_dialogues(data).records[0].messages, 10 ** 6, 10 ** 6)
    learned = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == t])
    assert "你好" in learned and "晚安" not in learned  # (the test tokenizer spells no ASCII: <unk>s)


def test_inspect_shows_calls_and_tools_and_convert_says_what_it_drops(tmp_path, capsys):
    from huayu.cli import main

    record = {"conversations": [{"from": "human", "value": "问"},
                                {"from": "function_call",
                                 "value": json.dumps({"name": "calc", "arguments": {"x": "1"}})},
                                {"from": "observation", "value": "1"}, {"from": "gpt", "value": "答"}],
              "tools": [CALC]}
    data = write(tmp_path / "d.jsonl", [record] * 3)
    assert main(["data", "inspect", data]) == 0
    out = capsys.readouterr().out
    assert "tools: offered in 3 dialogues (1 distinct); 3 tool calls" in out
    assert "  tools: calc" in out and '  assistant calls: calc({"x": "1"})' in out
    assert "  assistant: \n" not in out  # a call turn is not an empty reply
    assert main(["data", "convert", data, "--to", "eva", "--out", str(tmp_path / "eva")]) == 0
    out = capsys.readouterr().out
    for dropped in ("3 tool lists dropped", "3 tool calls dropped", "3 tool results dropped"):
        assert dropped in out
    assert (tmp_path / "eva").read_text(encoding="utf-8").splitlines()[0] == "问\t答"  # no split: one file
