"""Calls read out of replies (whole and streamed), the serve protocol's tool fields and errors, and the
chat loop that runs tools, driven by scripted replies (tests/test_tools_model.py: a trained model)."""

import json

import pytest
from pydantic import ValidationError

from huayu.serve.protocol import ChatRequest, validation_error
from huayu.tools import ReplyStream, parse_reply

CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "12+7"}}</tool_call>'
CALL = {"name": "calculator", "arguments": {"expression": "12+7"}}


@pytest.mark.parametrize("text, content, calls", [
    ("结果是19", "结果是19", []),
    (CALL_TEXT, "", [CALL]),
    ("好的。\n" + CALL_TEXT, "好的。", [CALL]),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12+7"}}\n</tool_call>', "", [CALL]),  # Qwen
    (CALL_TEXT + '<tool_call>{"name": "equation", "arguments": "{\\"equation\\": \\"x=1\\"}"}</tool_call>', "",
     [CALL, {"name": "equation", "arguments": {"equation": "x=1"}}]),  # arguments as JSON text
    ('<tool_call>{"name": "calculator", "arguments": {"expression"</tool_call>', None, []),  # bad JSON: text
    ('<tool_call>{"arguments": {}}</tool_call>', None, []),  # no name
    ('<tool_call>{"name": "calculator", "arguments": {"expr', None, []),  # cut off
])
def test_parse_reply(text, content, calls):
    assert parse_reply(text) == (text if content is None else content, calls)


def stream(pieces, calls=True):
    reply = ReplyStream(calls)
    shown = [reply.feed(piece) for piece in pieces]
    return shown, reply.finish()


def test_a_streamed_call_is_never_shown_as_text():
    pieces = ["好的", "。<", "tool", "_call>", '{"name": "calculator", "arguments": {"expression": "12+7"}}', "</tool_call>"]
    shown, (rest, content, calls) = stream(pieces)
    assert shown == ["好的", "。", "", "", "", ""] and (rest, content, calls) == ("", "好的。", [CALL])


def test_text_that_only_looked_like_a_call_is_shown_in_the_end():
    shown, (rest, content, calls) = stream(["a <", "tool", "box> b"])
    assert "".join(shown) == "a <toolbox> b" and rest == "" and calls == []
    shown, (rest, content, calls) = stream(["a ", "<tool_call>{bad"])
    assert shown == ["a ", ""] and rest == "<tool_call>{bad" and calls == []  # not a call: the held text goes out
    shown, (rest, content, calls) = stream(["a <", "tool_call>"], calls=False)
    assert shown == ["a <", "tool_call>"] and (rest, calls) == ("", [])


TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "计算12+7"}]
ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12+7"}'}}]}


def error(body) -> dict:
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate({"model": "m", **body})
    return validation_error(info.value.errors()).body()["error"]


def test_a_request_with_tools_calls_and_results():
    body = ChatRequest.model_validate({"model": "m", "tools": TOOLS, "messages": [
        *USER, ASSISTANT_CALL, {"role": "tool", "tool_call_id": "call_1", "content": "19"}]})
    assert body.messages_for_template() == [*USER, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                            {"role": "tool", "content": "19"}]
    assert body.offered_tools() == TOOLS
    none = ChatRequest.model_validate({"model": "m", "tools": TOOLS, "tool_choice": "none", "messages": USER})
    assert none.offered_tools() == []


@pytest.mark.parametrize("body, param, code, message", [
    ({"messages": USER, "tools": TOOLS, "tool_choice": "required"}, "tool_choice", "unsupported_value",
     "tool_choice 'required' is not supported by huayu serve: use 'auto' (the model decides) or 'none'"),
    ({"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}},
     "tool_choice", "unsupported_value", "tool_choice naming function 'calculator' is not supported"),
    ({"messages": USER, "tool_choice": "auto"}, "tool_choice", "invalid_value", "only allowed when tools are given"),
    ({"messages": USER, "tools": TOOLS * 2}, "tools", "invalid_value", "two tools share a name"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name",
     "invalid_value", "should match pattern"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools.0.function", "missing_required_parameter",
     "Missing required parameter"),
    ({"messages": [{"role": "tool", "content": "19"}]}, "messages.0.tool_call_id", "missing_required_parameter",
     "the id of the call this answers"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "19"}]}, "messages.1.tool_call_id",
     "invalid_value", "no call has this id"),
    ({"messages": [{"role": "assistant"}]}, "messages.0.content", "missing_required_parameter", "(or 'tool_calls')"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls", "invalid_value",
     "only assistant messages have tool_calls"),
    ({"messages": [*USER, {**ASSISTANT_CALL, "tool_calls": [{**ASSISTANT_CALL["tool_calls"][0], "function": {
        "name": "calculator", "arguments": "[1]"}}]}]}, "messages.1.tool_calls.0.function.arguments", "invalid_value",
     "not a JSON object"),
    ({"messages": USER, "parallel_tool_calls": False}, "parallel_tool_calls", "unsupported_parameter", "not supported"),
])
def test_bad_tool_requests_are_openai_400s_naming_the_field(body, param, code, message):
    e = error(body)
    assert (e["param"], e["code"]) == (param, code) and message in e["message"]


def test_replies_with_calls_in_openai_shape():
    from huayu.serve.server import Reply

    class Done:  # what the engine leaves in a finished request
        def __init__(self, text):
            self.text, self.finish_reason, self.out = text, "stop", [0]

    reply = Reply(True, "m", tool_calls=True)
    whole = reply.whole([Done("好的。" + CALL_TEXT), Done("结果是19")], {})
    first, second = whole["choices"]
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] == "好的。"
    (call,) = first["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "calculator", "arguments": json.dumps(CALL["arguments"])}
    assert second == {"index": 1, "message": {"role": "assistant", "content": "结果是19"}, "logprobs": None,
                      "finish_reason": "stop"}
    assert Reply(True, "m").whole([Done(CALL_TEXT)], {})["choices"][0]["message"]["content"] == CALL_TEXT  # no tools


class Scripted:
    """A generator's stream_ids replaced by replies written in advance."""

    def __init__(self, generator, replies):
        self.replies, self.prompts = iter(replies), []
        generator.stream_ids = self.stream_ids

    def stream_ids(self, prompt, decoding):
        self.prompts.append(prompt)
        text = next(self.replies)
        yield from (text[i:i + 5] for i in range(0, len(text), 5))


@pytest.fixture()
def session(tiny_model_dir):
    from huayu.chat import ChatConfig, ChatSession
    from huayu.generation import Generator

    generator = Generator.load(tiny_model_dir, template="huayu")
    session = ChatSession(generator, ChatConfig(model=tiny_model_dir, tools="calculator"))
    session.reported = []
    session.report = session.reported.append
    return session


def test_the_chat_loop_runs_the_call_and_goes_on(session):
    script = Scripted(session.generator, ["好的。" + CALL_TEXT, "结果是19"])
    assert "".join(session.reply("计算12+7")) == "好的。\n结果是19"
    assert session.reported == ['[调用 calculator] {"expression": "12+7"}', "[结果] 19"]
    tools = [{"type": "function", "function": {"name": "calculator", "description": "计算算术表达式", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    assert session.history == [{"role": "user", "content": "计算12+7"},
                               {"role": "assistant", "content": "好的。", "tool_calls": [CALL]},
                               {"role": "tool", "content": "19"}, {"role": "assistant", "content": "结果是19"}]
    assert script.prompts[1] == session.generator.encode_chat(  # the model went on after the result
        [{**session.history[0], "tools": tools}, *session.history[1:3]], session.cfg.max_source_length)


def test_a_refused_call_is_reported_to_the_model(session):
    bad = '<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>'
    Scripted(session.generator, [bad, "算不了"])
    assert "".join(session.reply("计算")) == "算不了"
    assert session.history[2]["content"].startswith("error: not allowed: calling __import__()")


def test_calls_in_a_row_end_as_text(session):
    from huayu.chat import MAX_TOOL_ROUNDS

    Scripted(session.generator, [CALL_TEXT] * (MAX_TOOL_ROUNDS + 1))
    assert "".join(session.reply("计算12+7")) == CALL_TEXT  # the last one is not run: shown as it is
    assert len(session.reported) == 2 * MAX_TOOL_ROUNDS


def test_chat_tools_need_a_template_that_renders_them(tiny_model_dir):
    from huayu.chat import ChatConfig, ChatSession
    from huayu.errors import HuayuError
    from huayu.generation import Generator

    generator = Generator.load(tiny_model_dir)
    generator.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(HuayuError, match="--tools: the model's chat template does not render tools"):
        ChatSession(generator, ChatConfig(model=tiny_model_dir, tools="calculator"))


def test_serving_tools_needs_a_template_that_renders_them(tiny_model_dir):
    from huayu.generation import Generator
    from huayu.serve.protocol import APIError
    from huayu.serve.server import ServeConfig, Service

    generator = Generator.load(tiny_model_dir)
    generator.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    service = Service(generator, None, "tiny", ServeConfig())
    with pytest.raises(APIError) as info:
        service.encode_chat(ChatRequest.model_validate({"model": "tiny", "messages": USER, "tools": TOOLS}))
    assert (info.value.status, info.value.param) == (400, "tools")
    assert "does not render tools" in info.value.message
    plain = ChatRequest.model_validate({"model": "tiny", "messages": USER, "tools": TOOLS, "tool_choice": "none"})
    assert service.encode_chat(plain) == generator.encode_chat(USER)  # "none": the tools are not rendered
