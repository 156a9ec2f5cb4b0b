"""Dialogues to token ids through the tokenizer's own chat template, with exact loss masks.

Each message is rendered by diffing the template's output for messages[:i] and messages[:i+1]. An
assistant message splits into a header (the generation prompt, e.g. "<|assistant|>", no loss) and a
body (content + end-of-turn, which is learned). A template that renders a turn differently once
the dialogue goes on (Qwen3 drops the reasoning of earlier replies) is not refused: each reply is
learned as the template renders it at inference, after the very prompt the model then gets
(`training_dialogues`). A registry template's reply-ending token is learned after every reply,
also where the template writes none (huayu/data/chat_templates.py).

Message content is always plain text: the template is rendered with an unguessable placeholder in
place of each content, the template's own text is tokenized with its special tokens and each
content with special tokens split into ordinary text. So a message containing "</s><|assistant|>"
(or "<|im_start|>system") cannot forge turns; control tokens come only from the template. The same
holds for tools (huayu/tools.py): every string in a tool schema or a call's arguments is a
placeholder too, and a dialogue with tools or calls under a template that does not render them is
refused rather than trained or prompted without them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from huayu.data.batching import IGNORE, Example
from huayu.data.chat_templates import reply_stop_id
from huayu.data.templates import DEFAULT_CHAT_TEMPLATE, SEP
from huayu.errors import HuayuError
from huayu.tools import split_tools

LOSS_ON = ("assistant", "last", "all")


@dataclass
class Segment:
    ids: list[int]
    message: int          # index of the message this segment belongs to
    is_target: bool       # an assistant body
    role: str = ""


def ensure_chat_template(tokenizer) -> None:
    """Give tokenizers without a template huayu's default, which is then saved with the model."""
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise HuayuError("the tokenizer has neither a chat template nor an eos token")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def plain_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of user text, special-token strings in it encoded as the ordinary text they are."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _split_reasoning(content: str) -> dict[str, str]:
    """A reply's <think> block as `reasoning_content`, split off as Qwen3's template splits it
    itself, which it cannot do on a placeholder: so the template places or drops the reasoning."""
    if "</think>" not in content:
        return {"content": content}
    return {"reasoning_content": content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
            "content": content.split("</think>")[-1].lstrip("\n")}


class _Placeholders:
    """Messages and tools whose texts are replaced by placeholders, and the ids of a rendering of them.
    Empty texts stay empty, since templates test them (GLM-4 skips an empty message); for a
    template that reads `reasoning_content` (Qwen3's), a reply's <think> block becomes that field.
    Tools and calls reach the template as transformers' templates take them (`tools=`, a call as
    {"type": "function", "function": {"name", "arguments"}}), every string in them a placeholder; one
    the template writes through `tojson` comes out quoted, its \x00 escaped, and that spelling
    stands for the text as tojson writes it."""

    def __init__(self, tokenizer, messages: list[dict]):
        nonce = secrets.token_hex(8)  # a user cannot write a placeholder into their message
        reasoning = "reasoning_content" in (tokenizer.chat_template or "")
        self.texts: dict[str, str] = {}  # a placeholder, bare or as tojson writes it -> the text it stands for
        self.names: list[str] = []       # the placeholders of tool and call names
        self.keys: set[str] = set()      # the keys of tool schemas and arguments, written as they are

        def hide(text: str) -> str:
            if not text:
                return text
            key = f"\x00{nonce}:{len(self.texts)}\x00"
            self.texts[key] = text
            self.texts[json.dumps(key)] = json.dumps(text, ensure_ascii=False)
            return key

        def hide_all(value):
            if isinstance(value, str):
                return hide(value)
            if isinstance(value, dict):
                self.keys.update(value)
                return {k: hide_all(v) for k, v in value.items()}
            return [hide_all(v) for v in value] if isinstance(value, list) else value

        def named(function: dict) -> dict:
            hidden = hide_all(function)
            self.names.append(hidden["name"])
            return hidden

        def hide_message(m: dict) -> dict:
            split = reasoning and m["role"] == "assistant"
            texts = _split_reasoning(m["content"]) if split else {"content": m["content"]}
            hidden = {**m, **{field: hide(text) for field, text in texts.items()}}
            if m.get("tool_calls"):
                hidden["tool_calls"] = [{"type": "function", "function": named(c)} for c in m["tool_calls"]]
            return hidden

        tools, messages = split_tools(messages)
        self.tools = [{"type": "function", "function": named(t["function"])} for t in tools] or None
        self.messages = [hide_message(m) for m in messages]
        self.pattern = re.compile("(" + re.escape(f"\x00{nonce}:") + r"\d+\x00|"
                                  + re.escape(f'"\\u0000{nonce}:') + r'\d+\\u0000")')

    def render(self, tokenizer, count: int | None = None, generation_prompt: bool = False) -> str:
        """The template's rendering of the first `count` messages (all by default)."""
        messages = self.messages if count is None else self.messages[:count]
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def check(self, tokenizer, rendered: str) -> None:
        """Refuse a template that drops tools or calls (one without a tool format silently would),
        and keys of tools or arguments that it would write as control tokens."""
        if any(name not in rendered and json.dumps(name) not in rendered for name in self.names):
            raise HuayuError("the chat template does not render tools and tool calls; use one that does: "
                             f"--template {', '.join(tool_templates())} (docs/tools.md)")
        keys = sorted(self.keys)
        written = tokenizer(keys, add_special_tokens=False, verbose=False)["input_ids"] if keys else []
        special = [k for k, ids, plain in zip(keys, written, plain_ids(tokenizer, keys)) if ids != plain]
        if special:
            raise HuayuError(f"tool schema or argument key(s) {', '.join(map(repr, special))} hold special-token "
                             "text, which the template would write as control tokens")

    def ids(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Ids of each rendered text: the template's text with its special tokens, placeholders' texts
        as plain text (each tokenizer call batched, so a long dialogue costs one pass)."""
        parts = [[p for p in self.pattern.split(text) if p] for text in texts]
        template = [p for ps in parts for p in ps if p not in self.texts]
        content = [self.texts[p] for ps in parts for p in ps if p in self.texts]
        encoded = iter(tokenizer(template, add_special_tokens=False, verbose=False)["input_ids"] if template else [])
        plain = iter(plain_ids(tokenizer, content))
        return [[t for p in ps for t in (next(plain) if p in self.texts else next(encoded))] for ps in parts]


def tool_templates() -> list[str]:
    """The registry templates that render tools."""
    from huayu.data.chat_templates import TEMPLATES

    return [t.name for t in TEMPLATES.values() if t.tools]


_TOOL_PROBE = [{"role": "user", "content": "u", "tools": [{"type": "function", "function": {"name": "f"}}]},
               {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"a": "1"}}]},
               {"role": "tool", "content": "r"}]


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's template renders tools, a call and its result (tried on a small
    dialogue), so that serving or chatting with tools can say so before the first request."""
    try:
        encode_prompt(tokenizer, _TOOL_PROBE, 10 ** 6)
    except Exception:  # refused here, or by the template itself (an unknown role, a Jinja error)
        return False
    return True


def _segment_texts(tokenizer, placeholders: _Placeholders) -> list[tuple[str, int, bool]]:
    """(text, message index, is a learnable assistant body) pieces whose concatenation is the
    rendering of the placeholders' messages.

    A piece ends wherever the rendering of the dialogue so far is a prefix of the whole: after
    every message, for a prefix-stable template. A turn the template renders differently once the
    dialogue goes on (a Qwen3 reply, whose reasoning is dropped; in Qwen's format a tool result
    followed by another, which shares its turn) is joined to the next. An assistant body is
    learnable when it follows its generation prompt and reads as the newest reply reads: exactly
    what the model is prompted with, and must write, at inference.
    """
    whole = placeholders.render(tokenizer)
    placeholders.check(tokenizer, whole)
    pieces, done = [], ""

    def reach(text: str, message: int, is_body: bool = False) -> bool:
        nonlocal done
        if len(text) < len(done) or not whole.startswith(text):
            return False
        pieces.append((text[len(done):], message, is_body))
        done = text
        return True

    for i, message in enumerate(placeholders.messages):
        prompted = message["role"] == "assistant" and reach(placeholders.render(tokenizer, i, True), i)
        reach(placeholders.render(tokenizer, i + 1), i, prompted)
    return [p for p in pieces if p[0]]


def segments(tokenizer, messages: list[dict]) -> list[Segment]:
    placeholders = _Placeholders(tokenizer, messages)
    pieces = _segment_texts(tokenizer, placeholders)
    ids = placeholders.ids(tokenizer, [p[0] for p in pieces])
    return [Segment(i, m, t, messages[m]["role"]) for i, (_, m, t) in zip(ids, pieces)]


def _last_assistant(messages: list[dict]) -> int:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise HuayuError("a dialogue has no assistant turn to learn")
    return last


def training_dialogues(tokenizer, messages: list[dict], loss_on: str) -> list[tuple[list[dict], str]]:
    """(messages, loss_on) to encode so that every assistant turn is learned once, as the template
    renders it at inference: the dialogue itself, plus each reply that its rendering shows
    otherwise (a Qwen3 reply without its reasoning) as a dialogue of its own that ends with it,
    its loss on that reply alone. The one sequence a prefix-stable template gives is untouched."""
    if loss_on != "assistant":
        return [(messages, loss_on)]
    last = _last_assistant(messages)
    pieces = _segment_texts(tokenizer, _Placeholders(tokenizer, messages[:last + 1]))
    learned = {m for _, m, is_body in pieces if is_body}
    rewritten = [i for i, m in enumerate(messages[:last]) if m["role"] == "assistant" and i not in learned]
    return [(messages[:i + 1], "last") for i in rewritten] + [(messages, loss_on)]


def _truncate_source(segs: list[Segment], max_len: int, keep_first: bool = False) -> list[Segment]:
    """Drop the oldest messages until the source fits, never a leading system message, the first
    message when `keep_first` (the tool list is rendered with it), nor the newest user message (and
    what follows it); if that is still too long, keep its newest tokens."""
    def size(ss):
        return sum(len(s.ids) for s in ss)

    users = [s.message for s in segs if s.role == "user"]
    newest = users[-1] if users else (segs[-1].message if segs else 0)
    while size(segs) > max_len:
        droppable = [s.message for s in segs if s.message < newest and s.role != "system"
                     and not (keep_first and s.message == 0)]
        if not droppable:
            break
        segs = [s for s in segs if s.message != droppable[0]]
    while size(segs) > max_len and segs:
        overflow = size(segs) - max_len
        if len(segs[0].ids) <= overflow:
            segs = segs[1:]
        else:
            head = segs[0]
            segs = [Segment(head.ids[overflow:], head.message, head.is_target, head.role)] + segs[1:]
    return segs


def split_budget(source_len: int, target_len: int, max_source_length: int, max_target_length: int,
                 limit: int) -> tuple[int, int]:
    """(room for the context, room for the reply) within `limit` tokens. The reply never crowds the
    prompt out: when both do not fit, each side gets half, and what one side leaves of its half goes
    to the other (an over-long reply keeps its prompt and is cut at its end)."""
    source, target = min(source_len, max_source_length), min(target_len, max_target_length)
    if source + target <= limit:
        return source, target
    half = limit // 2
    if source <= half:
        return source, limit - source
    if target <= limit - half:
        return limit - target, target
    return half, limit - half


def encode_dialogue(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                    loss_on: str = "assistant", max_length: int | None = None) -> Example:
    """Token ids and labels for one training dialogue; the last assistant turn is the target.

    The reply is cut to `max_target_length`, the context (from its oldest turn: the newest turns and
    a leading system message are kept) to `max_source_length`, and both together to `max_length`
    as split_budget shares it, so an over-long reply never leaves its prompt out. `full_length` is
    the uncut length. Turns after
    the last assistant message have nothing to learn and are not encoded. A learned reply the
    template does not end with its reply-ending token learns that token next: appended to the
    last reply; for an earlier one, as the label where the next turn begins (GLM's <|user|> is
    that token itself; Baichuan2's fine-tuning puts its eos there the same way).
    """
    last = _last_assistant(messages)
    segs = segments(tokenizer, messages[:last + 1])
    if not (segs and segs[-1].is_target and segs[-1].message == last):
        raise HuayuError("the chat template renders the last reply otherwise than after the prompt it gives for it "
                         "(the rendering with add_generation_prompt before the reply is not a prefix of the "
                         "rendering with it), so no training sequence matches inference")
    stop = reply_stop_id(tokenizer)

    def ended(ids: list[int]) -> bool:
        return stop is None or stop in ids

    reply = segs[-1].ids + ([] if ended(segs[-1].ids) else [stop])
    limit = max_length if max_length is not None else max_source_length + max_target_length
    source_room, target_room = split_budget(sum(len(s.ids) for s in segs[:-1]), len(reply), max_source_length,
                                            max_target_length, limit)
    target = reply[:target_room]
    source = _truncate_source(segs[:-1], source_room, keep_first=_has_tools(messages))
    ids, labels, stop_next = [], [], False
    for s in source:
        learn = loss_on == "all" or (loss_on == "assistant" and s.is_target)
        seg_labels = list(s.ids) if learn else [IGNORE] * len(s.ids)
        if stop_next:
            seg_labels[0] = stop
        stop_next = learn and s.is_target and not ended(s.ids)
        ids += s.ids
        labels += seg_labels
    return Example(ids + target, labels + target, full_length=sum(len(s.ids) for s in segs[:-1]) + len(reply))


def encode_prompt(tokenizer, context: list[dict], max_source_length: int) -> list[int]:
    """Ids of `context` plus the assistant header, truncated from the oldest turn. A prompt that
    fits is rendered once (linear in the number of messages); only one that must be cut is split
    into turns (which takes a rendering per turn)."""
    placeholders = _Placeholders(tokenizer, context)
    whole = placeholders.render(tokenizer, generation_prompt=True)
    placeholders.check(tokenizer, whole)
    (ids,) = placeholders.ids(tokenizer, [whole])
    if len(ids) <= max_source_length:
        return ids
    segs = segments(tokenizer, context)
    header = whole[len(placeholders.render(tokenizer)):]
    header_ids = tokenizer(header, add_special_tokens=False, verbose=False)["input_ids"] if header else []
    segs = _truncate_source(segs + [Segment(header_ids, len(context), False, "assistant")], max_source_length,
                            keep_first=_has_tools(context))
    return [t for s in segs for t in s.ids]


def _has_tools(messages: list[dict]) -> bool:
    return bool(split_tools(messages)[0])


def _text_only(messages: list[dict]) -> None:
    """Encoder-decoders and GLM's blank filling learn replies as text: a call would be lost."""
    if any(m.get("tool_calls") or m.get("tools") or m["role"] == "tool" for m in messages):
        raise HuayuError("tool calls need a decoder-only model with a chat template that renders them "
                         "(docs/tools.md); encoder-decoder and GLM models learn text replies only")


# -- encoder-decoder models: the context is the encoder's input, the reply the decoder's -------------

def _separator(tokenizer) -> str:
    """What joins context turns in an encoder's input: the tokenizer's sep token (BERT's [SEP]),
    huayu's <sep>, else the eos token."""
    return tokenizer.sep_token or (SEP if SEP in tokenizer.get_vocab() else tokenizer.eos_token)


def _source_segments(tokenizer, context: list[dict]) -> list[Segment]:
    """Each context turn's ids, a separator after every turn but the last."""
    sep = tokenizer(_separator(tokenizer), add_special_tokens=False, verbose=False)["input_ids"]
    ids = plain_ids(tokenizer, [m["content"] for m in context])
    return [Segment(turn + (sep if i < len(context) - 1 else []), i, False, m["role"])
            for i, (turn, m) in enumerate(zip(ids, context))]


def _cut_source(segs: list[Segment], max_source_length: int) -> list[int]:
    """The turns cut from the oldest (a leading system message is kept) to `max_source_length`."""
    return [t for s in _truncate_source(segs, max_source_length) for t in s.ids]


def encode_source(tokenizer, context: list[dict], max_source_length: int) -> list[int]:
    """The encoder input for `context`: its turns joined by the separator, cut from the oldest turn
    (a leading system message is kept) to `max_source_length`."""
    _text_only(context)
    return _cut_source(_source_segments(tokenizer, context), max_source_length)


def encode_source_target(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                         max_length: int | None = None) -> Example:
    """An encoder-decoder training example: source = the turns before the last assistant turn,
    target = that turn + eos, cut to `max_target_length` (eos kept); `max_length` caps both together.
    Only the reply carries loss: earlier assistant turns are context, as in EVA."""
    _text_only(messages)
    last = _last_assistant(messages)
    (reply,) = plain_ids(tokenizer, [messages[last]["content"]])
    limit = max_length if max_length is not None else max_source_length + max_target_length
    segs = _source_segments(tokenizer, messages[:last])
    source_room, target_room = split_budget(sum(len(s.ids) for s in segs), len(reply) + 1, max_source_length,
                                            max_target_length, limit)
    target = reply[:max(target_room - 1, 0)] + [tokenizer.eos_token_id]
    source = _cut_source(segs, source_room)
    return Example(source, target, full_length=sum(len(s.ids) for s in segs) + len(reply) + 1)


# -- GLM: the context (with the chat template) is Part A, the reply one [gMASK] span -----------------

def _glm_ids(tokenizer) -> tuple[int, int, int]:
    from huayu.data.templates import EOP, GMASK, SOP

    return tuple(tokenizer.convert_tokens_to_ids([GMASK, SOP, EOP]))


def encode_blank_prompt(tokenizer, context: list[dict], max_source_length: int) -> list[int]:
    """GLM's prompt for the assistant's next turn: `context` and the assistant header as Part A
    (cut from the oldest turn), then [gMASK] and the span's <sop>."""
    _text_only(context)
    gmask, sop, _ = _glm_ids(tokenizer)
    return encode_prompt(tokenizer, context, max(max_source_length - 2, 1)) + [gmask, sop]


def encode_blank_dialogue(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                          max_length: int | None = None) -> Example:
    """A GLM training example: the prompt of encode_blank_prompt, then the last assistant reply as
    the [gMASK] span, its labels aligned with the inputs (<sop> -> r1, ..., rn -> <eop>). Only the
    reply carries loss, as for encoder-decoders."""
    _text_only(messages)
    last = _last_assistant(messages)
    _, _, eop = _glm_ids(tokenizer)
    (reply,) = plain_ids(tokenizer, [messages[last]["content"]])
    limit = max_length if max_length is not None else max_source_length + max_target_length
    whole_prompt = len(encode_blank_prompt(tokenizer, messages[:last], limit + max_source_length))
    source_room, target_room = split_budget(whole_prompt, len(reply) + 1, max_source_length, max_target_length,
                                            limit)
    span = reply[:max(target_room - 1, 0)]
    prompt = encode_blank_prompt(tokenizer, messages[:last], source_room)
    labels = [IGNORE] * (len(prompt) - 1) + span + [eop]
    context = sum(len(s.ids) for s in segments(tokenizer, messages[:last]))
    return Example(prompt + span, labels, full_length=context + len(reply) + 3)
