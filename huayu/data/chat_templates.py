"""The field's chat templates by name, and `--template NAME|FILE.jinja` / `--system TEXT`.

Each entry is the model family's own Jinja text as its tokenizer_config.json ships it, so a model
fine-tuned with `--template qwen3` is prompted at inference exactly as Qwen3 is. Qwen2.5's and
Qwen3's keep their tool branches, chatml has Qwen's tool format and huayu's its own; the other
entries leave tools out, and a dialogue with tools is refused under them (docs/tools.md). An entry also names the special tokens it writes (a tokenizer must have each as one
token, or the markers would be learned as ordinary characters) and the token that ends a reply:
the one generation stops at, learned after every reply even where the template writes none
(GLM's replies end where the next `<|user|>` begins, Baichuan2's at an eos it never renders).
docs/templates.md tabulates them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huayu.data.templates import DEFAULT_CHAT_TEMPLATE
from huayu.errors import HuayuError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    models: str              # whose template it is
    text: str                # the Jinja source
    tokens: tuple[str, ...]  # the special tokens it writes
    stop: str | None = None  # the token a reply ends with; None: the tokenizer's eos token
    tools: bool = False      # renders tools, calls and results (docs/tools.md)
    former: tuple[str, ...] = ()  # sha256 of its earlier, tool-less texts, which render the same without tools


# Qwen's tool format (Qwen3's system turn) on plain ChatML turns: no default system prompt.
CHATML = ChatTemplate("chatml", "ChatML (OpenAI's format, Qwen's turns without Qwen's default system prompt)",
                      r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" and message.tool_calls %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif not (tools and loop.first and message.role == "system") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}""", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", tools=True,
                      former=("66edfb854931c933d3ac94f507626dd4fa2d5ca0a9b1036b11729d296a7392ac",))

QWEN2 = ChatTemplate("qwen2", "Qwen2-Instruct (ChatML; default system prompt \"You are a helpful assistant.\")", (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
), ("<|im_start|>", "<|im_end|>"), "<|im_end|>")

QWEN = ChatTemplate("qwen", "Qwen2.5-Instruct (ChatML with Qwen's default system prompt)",
                    r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", tools=True,
                    former=("a7b85912e5c385c3ed6cd1ad8232c0d98e05b9b2cec5c89cc35b885e15ea17dc",))

# Qwen3's hybrid-thinking template (Qwen3-8B and its siblings).
QWEN3 = ChatTemplate("qwen3", "Qwen3 (thinking blocks; earlier replies lose their reasoning)",
                     r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""", ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "<|im_end|>", tools=True,
                     former=("51c2c482a0483f3870dbd0722fef1a54e21aa01772f56a5eb19a49a23191004c",))

GLM4 = ChatTemplate("glm4", "GLM-4-9B-Chat", (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
), ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"), "<|user|>")

CHATGLM3 = ChatTemplate("chatglm3", "ChatGLM3-6B", (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
), ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"), "<|user|>")

LLAMA3 = ChatTemplate("llama3", "Llama-3-Instruct (and Llama3-Chinese fine-tunes)", (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>")

# vLLM's template_baichuan.jinja: Baichuan2's tokenizer ships none; its own build_chat_input lays
# out the same ids (system text, then <reserved_106> user / <reserved_107> assistant turns).
BAICHUAN2 = ChatTemplate("baichuan2", "Baichuan2-Chat",
                         r"""{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}

{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<reserved_106>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<reserved_107>' + message['content'] -}}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}
    {{- '<reserved_107>' -}}
{% endif %}""", ("<reserved_106>", "<reserved_107>"))

HUAYU = ChatTemplate("huayu", "huayu's own tokenizers and models", DEFAULT_CHAT_TEMPLATE,
                     ("<|system|>", "<|user|>", "<|assistant|>"), tools=True,
                     former=("485de2f1fc8b907ad22448e1748956dfc61d183d7201525f7d318a07fb4f95d2",))

TEMPLATES = {t.name: t for t in (CHATML, QWEN2, QWEN, QWEN3, GLM4, CHATGLM3, LLAMA3, BAICHUAN2, HUAYU)}
_BY_TEXT = {t.text: t for t in TEMPLATES.values()}
OWN = "tokenizer"  # --template's value for the tokenizer's own template (the default)

TEMPLATE_HELP = (f"chat template: {', '.join(TEMPLATES)}, a FILE.jinja, or {OWN} (the tokenizer's own; "
                 "docs/templates.md)")

# what a file's template writes that must be one token: <|...|> markers and <tag>s (not <<SYS>>)
_MARKER = re.compile(r"(?<!<)<\|?/?[A-Za-z_][\w.-]*\|?>(?!>)")
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


def template_of(tokenizer) -> ChatTemplate | None:
    """The registry entry the tokenizer's template is, or None: by its text (set by --template, or
    saved with a model fine-tuned with it), else by rendering a small dialogue exactly as the entry
    does (a checkpoint's own template: GLM-4-9B-Chat's, tool branches and all, is glm4)."""
    text = tokenizer.chat_template
    if not text or not isinstance(text, str):  # none, or several named ones
        return None
    if text in _BY_TEXT:
        return _BY_TEXT[text]
    key = (text, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _RENDERS_LIKE:
        _RENDERS_LIKE[key] = next((t for t in TEMPLATES.values() if _renders_like(tokenizer, t.text)), None)
    return _RENDERS_LIKE[key]


_RENDERS_LIKE: dict[tuple, ChatTemplate | None] = {}  # (template, bos, eos) -> the entry it renders like


def _renders_like(tokenizer, text: str) -> bool:
    """Whether the tokenizer's template renders a dialogue (with a reasoning reply last; as a
    prompt, with and without a system message) exactly as `text` does."""
    dialogue = _PROBE + [{"role": "assistant", "content": "<think>r</think>a"}]
    try:
        return all(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) ==
                   tokenizer.apply_chat_template(messages, chat_template=text, tokenize=False,
                                                 add_generation_prompt=prompt)
                   for messages, prompt in ((dialogue, False), (_PROBE, True), (_PROBE[1:], True)))
    except Exception:  # a template that refuses the dialogue (no system role, a missing bos token) is not `text`
        return False


def reply_stop_id(tokenizer) -> int | None:
    """The id of the token a reply ends with under the tokenizer's template, when it is a
    registry template (None otherwise: a template of unknown form is trained as it renders).
    Generation stops at it too: a base model fine-tuned with chatml ends replies with <|im_end|>,
    not its eos <|endoftext|>."""
    entry = template_of(tokenizer)
    if entry is None:
        return None
    return tokenizer.convert_tokens_to_ids(entry.stop) if entry.stop else tokenizer.eos_token_id


def use_template(tokenizer, spec: str | None) -> None:
    """Set the tokenizer's chat template to `spec` for this run: a registry name or a .jinja file;
    None or "tokenizer" keeps its own. A template whose markers the tokenizer lacks is refused."""
    if spec in (None, OWN):
        return
    if spec.endswith(".jinja"):
        text = _read_template_file(spec)
        markers = set(_MARKER.findall(_render_probe(tokenizer, text, spec)))
    elif spec in TEMPLATES:
        text, markers = TEMPLATES[spec].text, set(TEMPLATES[spec].tokens)
    else:
        raise HuayuError(f"--template {spec}: no such template; choose one of {', '.join(TEMPLATES)}, "
                         f"a .jinja file, or {OWN} for the tokenizer's own")
    _check_tokens(tokenizer, spec, text, markers)
    tokenizer.chat_template = text


def _read_template_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HuayuError(f"--template {path}: cannot read the chat template file: {exc}") from None


def _render_probe(tokenizer, text: str, path: str) -> str:
    """A small dialogue rendered by the file's template (without a system message if it refuses
    one), so that a template that is not valid Jinja fails here, naming the file."""
    errors = []
    for probe in (_PROBE, _PROBE[1:]):
        try:
            return tokenizer.apply_chat_template(probe, chat_template=text, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # Jinja syntax errors, raise_exception(), type errors in the template
            errors.append(exc)
    raise HuayuError(f"--template {path}: not a usable chat template: cannot render a user/assistant "
                     f"dialogue ({type(errors[-1]).__name__}: {errors[-1]})")


def _check_tokens(tokenizer, spec: str, text: str, markers: set[str]) -> None:
    """Every marker must be one token of the tokenizer, and bos/eos tokens the template `text`
    writes must exist: otherwise turns would be split into ordinary characters, silently."""
    unk = tokenizer.unk_token_id
    missing = sorted(m for m in markers
                     if len(ids := tokenizer(m, add_special_tokens=False)["input_ids"]) != 1 or ids[0] == unk)
    missing += [f"a {name.replace('_', ' ')}" for name in ("bos_token", "eos_token")
                if name in text and getattr(tokenizer, name) is None]
    if missing:
        raise HuayuError(f"--template {spec}: the tokenizer lacks {', '.join(missing)} (not one token each); use a "
                         "template written in its own tokens (--template huayu for huayu's tokenizers), or a "
                         "tokenizer that has them")


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with a leading system message `system`, unless it is None or they have one."""
    if system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}] + messages
