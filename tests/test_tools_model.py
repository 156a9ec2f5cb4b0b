"""A tiny model trained here (a few hundred steps) to call the calculator: it calls it on arithmetic
questions it never saw, in `huayu chat --tools calculator` and through `huayu serve` with the
official openai client (tools -> tool_calls -> the result sent back -> the answer), so that what the
parsers read is text a model generated."""

import json
import random

import openai
import pytest
from test_serve import serving

from huayu.plugins import PLUGINS

TOOLS = [PLUGINS["calculator"].schema()]
HELD_OUT = [(23, 45), (67, 18), (91, 36)]


def dialogue(a: int, b: int) -> list[dict]:
    """"计算a+b" -> a call of the calculator -> its result -> "结果是…"."""
    expression, result = f"{a}+{b}", str(a + b)
    return [{"role": "user", "content": f"计算{expression}", "tools": TOOLS},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator",
                                                                  "arguments": {"expression": expression}}]},
            {"role": "tool", "content": result}, {"role": "assistant", "content": f"结果是{result}"}]


@pytest.fixture(scope="module")
def calculator_model(tmp_path_factory):
    """A 2-layer decoder trained on 2-digit additions, HELD_OUT left out (it calls the calculator right
    on 63 of 63 unseen questions, for each of 6 seeds tried). A byte-level BPE learned on the
    dialogues makes the fixed text (the tool list, the call syntax) few tokens and every number one,
    so a step is short and a copy is one token; ~40 s on 2 busy cores."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from huayu.data.batching import IGNORE
    from huayu.data.chat import encode_dialogue
    from huayu.tokenizer import train_tokenizer

    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) not in HELD_OUT]
    random.Random(0).shuffle(pairs)
    train = [dialogue(a, b) for a, b in pairs[:3200]]
    numbers = "\n".join(map(str, range(10, 199)))
    tags = "<tools>\n</tools><tool_call></tool_call><tool_response></tool_response>"
    tokenizer = train_tokenizer([json.dumps(d, ensure_ascii=False) for d in train] + [numbers, tags] * 100,
                                kind="bpe", vocab_size=600)
    examples = [encode_dialogue(tokenizer, d, 512, 512) for d in train]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two contended ones
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    steps, batch = 800, 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 20) * max(0.1, 1 - s / steps))
    for step in range(steps):
        rows = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.tensor([r.input_ids + [0] * (width - len(r.input_ids)) for r in rows])
        labels = torch.tensor([r.labels + [IGNORE] * (width - len(r.labels)) for r in rows])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("calculator-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_chat_calls_the_calculator_on_questions_it_never_saw(calculator_model, monkeypatch, capsys):
    import io

    from huayu.cli import main

    questions = "\nclear\n".join(f"计算{a}+{b}" for a, b in HELD_OUT)
    monkeypatch.setattr("sys.stdin", io.StringIO(questions + "\n"))
    assert main(["chat", calculator_model, "--tools", "calculator", "--do-sample", "false",
                 "--repetition-penalty", "1", "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    for a, b in HELD_OUT:
        assert f'[调用 calculator] {{"expression": "{a}+{b}"}}\n[结果] {a + b}\n' in err
    replies = out.splitlines()
    assert len(replies) == len(HELD_OUT) and all(r.startswith("结果是") for r in replies)  # no call text shown
    assert sum(r == f"结果是{a + b}" for r, (a, b) in zip(replies, HELD_OUT)) >= 2  # the result, copied


@pytest.fixture(scope="module")
def client(calculator_model):
    with serving(calculator_model, "--served-model-name", "calc") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_serve_round_trip_with_the_openai_client(client):
    a, b = HELD_OUT[0]
    messages = [{"role": "user", "content": f"计算{a}+{b}"}]
    first = client.chat.completions.create(model="calc", messages=messages, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": f"{a}+{b}"}
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": str(a + b)}]
    second = client.chat.completions.create(model="calc", messages=messages, tools=TOOLS, temperature=0)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content.startswith("结果是")


def test_a_streamed_call_arrives_as_a_tool_calls_delta(client):
    a, b = HELD_OUT[1]
    chunks = list(client.chat.completions.create(model="calc", messages=[{"role": "user", "content": f"计算{a}+{b}"}],
                                                 tools=TOOLS, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == ""  # the call's text is never streamed as content
    (call,) = [t for d in deltas for t in d.tool_calls or []]
    assert call.index == 0 and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": f"{a}+{b}"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_required(client):
    user = [{"role": "user", "content": "计算12+7"}]
    none = client.chat.completions.create(model="calc", messages=user, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=30)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="calc", messages=user, tools=TOOLS, tool_choice="required")
    assert info.value.body["param"] == "tool_choice" and info.value.body["code"] == "unsupported_value"
