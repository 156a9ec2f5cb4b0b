"""Dialogues to token ids through the tokenizer's own chat template, with exact loss masks.

Each message is rendered by diffing the template's output for messages[:i] and messages[:i+1], so
any prefix-stable Jinja template works (huayu's default, Qwen's, ...). An assistant message splits
into a header (e.g. "<|assistant|>", no loss) and a body (content + end-of-turn, which is learned).

Message content is always plain text: the template is rendered with an unguessable placeholder in
place of each content, the template's own text is tokenized with its special tokens and each
content with special tokens split into ordinary text. So a message containing "</s><|assistant|>"
(or "<|im_start|>system") cannot forge turns; control tokens come only from the template.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from huayu.data.batching import IGNORE, Example
from huayu.data.templates import DEFAULT_CHAT_TEMPLATE, SEP
from huayu.errors import HuayuError

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


class _Placeholders:
    """Messages whose contents are replaced by placeholders, and the ids of a rendering of them."""

    def __init__(self, messages: list[dict]):
        nonce = secrets.token_hex(8)  # a user cannot write a placeholder into their message
        self.keys = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
        self.messages = [{**m, "content": key} for m, key in zip(messages, self.keys)]
        self.contents = {key: m["content"] for m, key in zip(messages, self.keys)}
        self.pattern = re.compile("(" + re.escape(f"\x00{nonce}:") + r"\d+\x00)")

    def ids(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Ids of each rendered text: the template's text with its special tokens, contents as plain
        text (each tokenizer call batched, so a long dialogue costs one pass)."""
        parts = [[p for p in self.pattern.split(text) if p] for text in texts]
        template = [p for ps in parts for p in ps if p not in self.contents]
        content = [self.contents[p] for ps in parts for p in ps if p in self.contents]
        encoded = iter(tokenizer(template, add_special_tokens=False, verbose=False)["input_ids"] if template else [])
        plain = iter(plain_ids(tokenizer, content))
        return [[t for p in ps for t in (next(plain) if p in self.contents else next(encoded))] for ps in parts]


def _render(tokenizer, messages, generation_prompt=False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _segment_texts(tokenizer, messages: list[dict]) -> list[tuple[str, int, bool]]:
    """(text, message index, is assistant body) pieces whose concatenation is the full rendering."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        full = _render(tokenizer, messages[:i + 1])
        if not full.startswith(done):
            raise HuayuError("the chat template is not prefix-stable: rendering a longer dialogue "
                             "changed the text of earlier turns")
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)[len(done):]
            body = full[len(done) + len(header):]
            pieces += [(header, i, False), (body, i, True)]
        else:
            pieces.append((full[len(done):], i, False))
        done = full
    return [p for p in pieces if p[0]]


def segments(tokenizer, messages: list[dict]) -> list[Segment]:
    placeholders = _Placeholders(messages)
    pieces = _segment_texts(tokenizer, placeholders.messages)
    ids = placeholders.ids(tokenizer, [p[0] for p in pieces])
    return [Segment(i, m, t, messages[m]["role"]) for i, (_, m, t) in zip(ids, pieces)]


def _truncate_source(segs: list[Segment], max_len: int) -> list[Segment]:
    """Drop the oldest messages until the source fits, never a leading system message nor the
    newest user message (and what follows it); if that is still too long, keep its newest tokens."""
    def size(ss):
        return sum(len(s.ids) for s in ss)

    users = [s.message for s in segs if s.role == "user"]
    newest = users[-1] if users else (segs[-1].message if segs else 0)
    while size(segs) > max_len:
        droppable = [s.message for s in segs if s.message < newest and s.role != "system"]
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


def _last_target(segs: list[Segment]) -> int:
    for k in range(len(segs) - 1, -1, -1):
        if segs[k].is_target:
            return k
    raise HuayuError("a dialogue has no assistant turn to learn")


def encode_dialogue(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                    loss_on: str = "assistant", max_length: int | None = None) -> Example:
    """Token ids and labels for one training dialogue; the last assistant turn is the target.

    The reply is cut to `max_target_length` (and `max_length`), the context to `max_source_length`
    and to what `max_length` leaves beside the reply. `full_length` is the uncut length. Turns after
    the last assistant message have nothing to learn and are not encoded.
    """
    segs = segments(tokenizer, messages)
    k = _last_target(segs)
    limit = max_length if max_length is not None else max_source_length + max_target_length
    target = segs[k].ids[:min(max_target_length, limit)]
    source = _truncate_source(segs[:k], min(max_source_length, limit - len(target)))
    ids, labels = [], []
    for s in source:
        learn = loss_on == "all" or (loss_on == "assistant" and s.is_target)
        ids += s.ids
        labels += s.ids if learn else [IGNORE] * len(s.ids)
    return Example(ids + target, labels + target, full_length=sum(len(s.ids) for s in segs[:k + 1]))


def encode_prompt(tokenizer, context: list[dict], max_source_length: int) -> list[int]:
    """Ids of `context` plus the assistant header, truncated from the oldest turn. A prompt that
    fits is rendered once (linear in the number of messages); only one that must be cut is split
    into turns (which takes a rendering per turn)."""
    placeholders = _Placeholders(context)
    whole = _render(tokenizer, placeholders.messages, generation_prompt=True)
    (ids,) = placeholders.ids(tokenizer, [whole])
    if len(ids) <= max_source_length:
        return ids
    segs = segments(tokenizer, context)
    header = whole[len(_render(tokenizer, placeholders.messages)):]
    header_ids = tokenizer(header, add_special_tokens=False, verbose=False)["input_ids"] if header else []
    segs = _truncate_source(segs + [Segment(header_ids, len(context), False, "assistant")], max_source_length)
    return [t for s in segs for t in s.ids]


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
    return _cut_source(_source_segments(tokenizer, context), max_source_length)


def encode_source_target(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                         max_length: int | None = None) -> Example:
    """An encoder-decoder training example: source = the turns before the last assistant turn,
    target = that turn + eos, cut to `max_target_length` (eos kept); `max_length` caps both together.
    Only the reply carries loss: earlier assistant turns are context, as in EVA."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise HuayuError("a dialogue has no assistant turn to learn")
    (reply,) = plain_ids(tokenizer, [messages[last]["content"]])
    limit = max_length if max_length is not None else max_source_length + max_target_length
    target = reply[:max(min(max_target_length, limit) - 1, 0)] + [tokenizer.eos_token_id]
    segs = _source_segments(tokenizer, messages[:last])
    source = _cut_source(segs, min(max_source_length, limit - len(target)))
    return Example(source, target, full_length=sum(len(s.ids) for s in segs) + len(reply) + 1)


# -- GLM: the context (with the chat template) is Part A, the reply one [gMASK] span -----------------

def _glm_ids(tokenizer) -> tuple[int, int, int]:
    from huayu.data.templates import EOP, GMASK, SOP

    return tuple(tokenizer.convert_tokens_to_ids([GMASK, SOP, EOP]))


def encode_blank_prompt(tokenizer, context: list[dict], max_source_length: int) -> list[int]:
    """GLM's prompt for the assistant's next turn: `context` and the assistant header as Part A
    (cut from the oldest turn), then [gMASK] and the span's <sop>."""
    gmask, sop, _ = _glm_ids(tokenizer)
    return encode_prompt(tokenizer, context, max(max_source_length - 2, 1)) + [gmask, sop]


def encode_blank_dialogue(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int,
                          max_length: int | None = None) -> Example:
    """A GLM training example: the prompt of encode_blank_prompt, then the last assistant reply as
    the [gMASK] span, its labels aligned with the inputs (<sop> -> r1, ..., rn -> <eop>). Only the
    reply carries loss, as for encoder-decoders."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise HuayuError("a dialogue has no assistant turn to learn")
    _, _, eop = _glm_ids(tokenizer)
    (reply,) = plain_ids(tokenizer, [messages[last]["content"]])
    limit = max_length if max_length is not None else max_source_length + max_target_length
    span = reply[:max(min(max_target_length, limit) - 1, 0)]
    prompt = encode_blank_prompt(tokenizer, messages[:last], min(max_source_length, limit - len(span)))
    labels = [IGNORE] * (len(prompt) - 1) + span + [eop]
    context = sum(len(s.ids) for s in segments(tokenizer, messages[:last]))
    return Example(prompt + span, labels, full_length=context + len(reply) + 3)
