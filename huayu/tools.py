"""Tool calling: tools and calls as huayu holds them, and calls read out of a model's reply.

A dialogue with tools is ordinary messages with three additions (docs/tools.md):

- an assistant message may carry `tool_calls`: [{"name": str, "arguments": dict}], its `content`
  being the text before the calls (often "");
- a `tool` message holds a call's result as its `content`;
- the tools, in OpenAI's form {"type": "function", "function": {"name", "description",
  "parameters"}}, ride on the dialogue's first message as `tools` (GLM-4's convention), so that
  everything handing a dialogue's messages on (SFT, eval, the cache) hands its tools on too.

huayu's template and Qwen's write a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(Qwen with newlines inside the tags), so one parser reads the replies of both.
"""

from __future__ import annotations

import json
import re

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_START) + r"(.*?)" + re.escape(CALL_END), re.S)


def function_tool(raw) -> dict:
    """A tool in OpenAI's form, from OpenAI's form or a bare function schema (glaive's, LLaMA-Factory's).
    Only name, description and parameters are kept: they are what a template renders. ValueError
    says what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a tool must be an object, got {type(raw).__name__}")
    if "type" in raw and raw["type"] != "function":
        raise ValueError(f"tool type {raw['type']!r}: only function tools are supported")
    spec = raw["function"] if "function" in raw else raw
    if not isinstance(spec, dict):
        raise ValueError("a tool's function must be an object with a name")
    name = spec.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ValueError(f"tool name {name!r}: expected 1 to 64 letters, digits, _ or -")
    if not isinstance(spec.get("description", ""), str):
        raise ValueError(f"tool {name}: the description must be text")
    if not isinstance(spec.get("parameters", {}), dict):
        raise ValueError(f"tool {name}: the parameters must be a JSON schema object")
    return {"type": "function", "function": {k: spec[k] for k in ("name", "description", "parameters") if k in spec}}


def function_tools(raw) -> list[dict]:
    """A dialogue's tool list: a list, or a JSON text of one (glaive writes it so); "" is none."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of tools: {exc.msg}") from None
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of tools, got {type(raw).__name__}")
    tools = [function_tool(t) for t in raw]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise ValueError(f"two tools share a name: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    return tools


def tool_call(raw) -> dict:
    """{"name", "arguments": dict} from huayu's form or OpenAI's ({"type": "function", "function":
    {"name", "arguments": JSON text}}, its id dropped); ValueError says what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a tool call must be an object, got {type(raw).__name__}")
    call = raw["function"] if isinstance(raw.get("function"), dict) else raw
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ValueError(f"tool call name {name!r}: expected 1 to 64 letters, digits, _ or -")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"call of {name}: the arguments are not JSON: {exc.msg}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"call of {name}: the arguments must be a JSON object")
    return {"name": name, "arguments": arguments}


def split_tools(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the tools the first message carrying any holds, the messages without them)."""
    tools = next((m["tools"] for m in messages if m.get("tools")), [])
    return tools, [{k: v for k, v in m.items() if k != "tools"} for m in messages]


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` with `tools` on the first one (unchanged when there are none)."""
    if not tools or not messages:
        return messages
    return [{**messages[0], "tools": tools}] + messages[1:]


def parse_reply(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a reply: the calls in its <tool_call> blocks and the text around them.
    A block that is not a call (bad JSON, no name) leaves the whole reply as text, calls and all,
    so that nothing the model wrote is lost."""
    blocks = _CALL.findall(text)
    try:
        calls = [tool_call(json.loads(block)) for block in blocks]
    except ValueError:  # json.JSONDecodeError is one
        return text.strip(), []
    return _CALL.sub("", text).strip(), calls


class ReplyStream:
    """A reply's text as it is generated, passed on (`feed`) until a call may begin, then held to be
    read whole at the end (`finish`): a client sees content, never a call's raw text."""

    def __init__(self, calls: bool = True):
        self.calls = calls  # False: a plain reply, passed on as it comes
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> str:
        """The text that can be shown now."""
        from huayu.serve.engine import held_back

        self.text += piece
        if not self.calls:
            end = len(self.text)
        elif CALL_START in self.text:
            end = self.text.index(CALL_START)
        else:  # what could be the start of <tool_call> waits for the next piece
            end = len(self.text) - held_back(self.text, [CALL_START])
        end = max(end, self.sent)
        shown, self.sent = self.text[self.sent:end], end
        return shown

    def finish(self) -> tuple[str, str, list[dict]]:
        """(text still to show, the reply's content, its calls) once the reply is complete."""
        content, calls = parse_reply(self.text) if self.calls else (self.text.strip(), [])
        return ("" if calls else self.text[self.sent:]), content, calls
