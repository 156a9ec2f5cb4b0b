"""The OpenAI request schemas `huayu serve` accepts, and its errors in OpenAI's format.

Requests are validated strictly, as OpenAI does: an unknown field, a role other than system /
developer / user / assistant / tool, empty messages or an out-of-range parameter is a 400 whose body
names the field (`{"error": {"message", "type", "param", "code"}}`). Parameters OpenAI has but huayu
does not implement (logprobs, tool_choice "required", ...) are refused by name rather than ignored.
Every sampling parameter is bounded so that no value that passes here can fail the batch it decodes in.
Tools (docs/tools.md): `tools` with `tool_choice` "auto" (the default) or "none"; assistant messages
with `tool_calls` and `tool` messages answering them.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from huayu.serve.sampling import SamplingParams
from huayu.tools import TOOL_NAME, function_tool, tool_call


class APIError(Exception):
    """An error answered as `{"error": {...}}` with HTTP status `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as an OpenAI 400 naming its field (`messages.0.role`, `top_p`)."""
    e = errors[0]
    if e["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                        code="invalid_json")
    loc = [str(x) for x in e["loc"] if x != "body"]
    param = ".".join(loc) or None
    if e["type"] == "unsupported_parameter":
        param = e["ctx"]["param"]
        return APIError(400, f"'{param}' is not supported by huayu serve", param=param, code="unsupported_parameter")
    if e["type"] == "unsupported_value":
        return APIError(400, e["msg"], param=param, code="unsupported_value")
    if e["type"] == "missing_field":
        param = ".".join(loc + [e["ctx"]["field"]])
        return APIError(400, f"Missing required parameter: '{param}'{e['ctx']['why']}", param=param,
                        code="missing_required_parameter")
    if e["type"] == "misplaced":
        param = ".".join(loc + [e["ctx"]["field"]])
        return APIError(400, f"{param}: {e['msg']}", param=param, code="invalid_value")
    if e["type"] == "not_unicode":
        param = e["ctx"]["param"]
        return APIError(400, f"{param}: holds half a UTF-16 surrogate pair (such as \\ud800), which is not text",
                        param=param, code="invalid_value")
    if e["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if e["type"] == "missing" and not loc:
        return APIError(400, "the request body is empty; it must be a JSON object", code="invalid_json")
    if e["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if e["type"] == "literal_error" and loc[-1:] == ["role"]:
        return APIError(400, f"{param}: unknown role {e['input']!r}; expected one of {', '.join(API_ROLES)}",
                        param=param, code="invalid_value")
    where = f"{param}: " if param else "the request body: "
    return APIError(400, f"{where}{e['msg']} (got {e.get('input')!r})"[:500], param=param, code="invalid_value")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def json_object(cls, arguments):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return arguments


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


API_ROLES = ("system", "developer", "user", "assistant", "tool")


class Message(Strict):
    role: Literal[API_ROLES]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def fields_of_the_role(cls, message):
        """Content is required but for an assistant's calls; a tool result names its call; only an
        assistant calls."""
        if not isinstance(message, dict) or message.get("role") not in API_ROLES:
            return message  # the role's own error says what is wrong
        role = message["role"]
        if message.get("content") is None and not (role == "assistant" and message.get("tool_calls")):
            why = "" if role != "assistant" else " (or 'tool_calls')"
            raise PydanticCustomError("missing_field", "missing", {"field": "content", "why": why})
        if role == "tool" and not message.get("tool_call_id"):
            raise PydanticCustomError("missing_field", "missing", {"field": "tool_call_id",
                                                                   "why": ": the id of the call this answers"})
        for field, owner in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
            if message.get(field) is not None and role != owner:
                raise PydanticCustomError("misplaced", f"only {owner} messages have {field}", {"field": field})
        return message

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def for_template(self) -> dict:
        """huayu's message (huayu/tools.py); OpenAI's `developer` is the system role."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [tool_call(c.function.model_dump()) for c in self.tool_calls]
        return message


class FunctionSpec(Strict):
    name: str = Field(pattern=f"^{TOOL_NAME.pattern}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


# OpenAI parameters huayu does not implement, with the values that ask for nothing (accepted).
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "parallel_tool_calls": (None, True), "functions": (None, []), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"}), "best_of": (None, 1), "echo": (None, False),
               "suffix": (None, "")}
# a stop string is looked for in the text after every token: a long one would slow the whole batch
MAX_STOP_CHARS = 256


class Decoding(Strict):
    """The sampling parameters both endpoints share; top_k, repetition_penalty and ignore_eos are
    extensions (as in vLLM), passed with the openai client's `extra_body`."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 63)   # OpenAI's int64
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int = Field(0, ge=0)                                # beyond the vocabulary: all of it
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)    # logits * or / 100 at most: finite
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, body):
        """Refuse an OpenAI parameter huayu does not implement by name, rather than ignore it."""
        if isinstance(body, dict):
            for name, harmless in UNSUPPORTED.items():
                if name in body and body[name] not in harmless:
                    raise PydanticCustomError("unsupported_parameter", "{param} is not supported by huayu serve",
                                              {"param": name})
            body = {k: v for k, v in body.items() if k not in UNSUPPORTED}
        return body

    @model_validator(mode="before")
    @classmethod
    def refuse_surrogates(cls, body):
        """JSON may escape half a surrogate pair ("\\ud800"), which no tokenizer or reply can encode."""
        for name, value in body.items() if isinstance(body, dict) else ():
            try:
                json.dumps(value, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise PydanticCustomError("not_unicode", "{param} is not valid text", {"param": name}) from None
        return body

    @field_validator("stop")
    @classmethod
    def few_short_stops(cls, stop):
        """Up to 4 stop strings, as OpenAI takes, each of at most MAX_STOP_CHARS."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, not {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stop

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              stop=[s for s in stop if s], seed=self.seed, ignore_eos=self.ignore_eos)


class ChatRequest(Decoding):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @field_validator("tool_choice")
    @classmethod
    def auto_or_none(cls, choice):
        """"required" and a named function would need decoding forced into a call: not implemented."""
        if choice is not None and choice not in ("auto", "none"):
            shown = repr(choice) if isinstance(choice, str) else f"naming function {choice.function.name!r}"
            raise PydanticCustomError("unsupported_value", "tool_choice {choice} is not supported by huayu serve: "
                                      "use 'auto' (the model decides) or 'none'", {"choice": shown})
        return choice

    @model_validator(mode="after")
    def tools_and_calls_agree(self):
        if self.tool_choice is not None and not self.tools:
            raise PydanticCustomError("misplaced", "only allowed when tools are given",
                                      {"field": "tool_choice"})
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise PydanticCustomError("misplaced", "two tools share a name", {"field": "tools"})
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            calls |= {c.id for c in m.tool_calls or []}
            if m.role == "tool" and m.tool_call_id not in calls:
                raise PydanticCustomError("misplaced", "a tool message must answer a tool call of an earlier "
                                          "assistant message (no call has this id)",
                                          {"field": f"messages.{i}.tool_call_id"})
        return self

    def offered_tools(self) -> list[dict]:
        """The tools the model is shown: none with tool_choice "none"."""
        if self.tool_choice == "none":
            return []
        return [function_tool(t.function.model_dump(exclude_none=True, exclude={"strict"})) for t in self.tools or []]

    def messages_for_template(self) -> list[dict]:
        return [m.for_template() for m in self.messages]


class CompletionRequest(Decoding):
    prompt: str | list[str] = Field(min_length=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt
