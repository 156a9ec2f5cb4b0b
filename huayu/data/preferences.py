"""Pairwise preference data: a prompt and two replies, the chosen one preferred to the rejected one.

Two shapes are read, told apart by the keys of a file's first record:

- `pairs`: a record with `chosen` and `rejected` and a prompt under `conversations` (LLaMA-Factory's
  dpo_zh_demo.json: ShareGPT turns, the replies `{"from": "gpt", "value": ...}`), `messages`
  (role/content turns) or `prompt` (a text, or turns as in trl's conversational format). A reply is
  a text, one assistant turn, or a list holding one.
- `ranking`: an Alpaca record (`instruction`, `input`, `history`, `system`) whose `output` lists the
  replies best first (oaast_rm_zh.json); as LLaMA-Factory reads it, the first is chosen and the
  second rejected.

Records are validated and collected as huayu.data.formats does for dialogues: a DataError naming the
file, the record and the reason, or with skip_invalid a counted skip. Encoded pairs hold each reply
after its prompt exactly as `huayu sft` encodes a reply (huayu.data.chat), so a reward model or DPO
scores the sequences the SFT model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huayu.data.batching import Example
from huayu.data.formats import (DEFAULT_ROLE_MAP, ReadResult, _alpaca_build, _chat_turn, _collect, _Invalid,
                                _is_json, _json_entries, _keys, _object, _peek, _require_exists, _required,
                                _system_messages, _text, _type_name)
from huayu.errors import DataError, HuayuError

PREFERENCE_FORMATS = ("pairs", "ranking")
PROMPT_KEYS = ("conversations", "messages", "prompt")


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # the turns before the replies, the last a user turn
    chosen: str
    rejected: str
    source: str  # "path:record N" or "path:line N"


def preference_format(record: dict) -> str | None:
    """`pairs` or `ranking` from a record's keys, or None for other data."""
    if {"chosen", "rejected"} <= record.keys():
        return "pairs"
    if "instruction" in record and isinstance(record.get("output"), list):
        return "ranking"
    return None


def detect_preference_format(path) -> str | None:
    """The preference format of a JSON/JSONL file, from its first record; None when it holds
    something else (dialogues, texts) or is not JSON."""
    path = Path(path)
    _require_exists(path)
    if path.is_dir() or not _is_json(path):
        return None
    _, first, _ = _peek(_json_entries(path))
    return preference_format(first) if first is not None else None


# ---------------------------------------------------------------- record builders


def _reply(value, label: str) -> str:
    """A reply: a text, an assistant turn ({"role"|"from", "content"|"value"}), or a list of one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise _Invalid(f"{label}: expected one assistant turn, got a list of {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        turn = _chat_turn(value, label, DEFAULT_ROLE_MAP)
        if turn["role"] != "assistant":
            raise _Invalid(f"{label}: expected an assistant turn, got a {turn['role']} turn")
        if turn.get("tool_calls"):
            raise _Invalid(f"{label}: a reply that calls tools is not a text reply to compare")
        return turn["content"]
    return _text(value, label)


def _prompt(record: dict) -> list[dict[str, str]]:
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        raise _Invalid(f"missing the prompt: one of {', '.join(map(repr, PROMPT_KEYS))} (keys: {_keys(record)})")
    value = record[key]
    if isinstance(value, str):
        turns = [{"role": "user", "content": _text(value, key)}]
    elif isinstance(value, list):
        turns = [_chat_turn(t, f"{key} turn {i}", DEFAULT_ROLE_MAP) for i, t in enumerate(value, 1)]
    else:
        raise _Invalid(f"{key}: expected a text or a list of turns, got {_type_name(value)}")
    return _system_messages(record) + turns


def _checked(prompt: list[dict[str, str]], chosen: str, rejected: str, source: str) -> list[PreferencePair]:
    if not prompt or prompt[-1]["role"] != "user":
        raise _Invalid("the prompt must end with a user turn (the replies answer it)")
    return [PreferencePair(prompt, chosen, rejected, source)]


def _pairs_build(raw, source: str) -> list[PreferencePair]:
    record = _object(raw)
    return _checked(_prompt(record), _reply(_required(record, "chosen"), "chosen"),
                    _reply(_required(record, "rejected"), "rejected"), source)


def _ranking_build(raw, source: str) -> list[PreferencePair]:
    record = _object(raw)
    output = record.get("output")
    if not isinstance(output, list) or len(output) < 2:
        raise _Invalid(f"output: expected a list of at least 2 replies, best first, got {_type_name(output)}"
                       + (f" of {len(output)}" if isinstance(output, list) else ""))
    chosen, rejected = (_text(output[i], f"output {i + 1}") for i in (0, 1))
    prompt = _alpaca_build({**record, "output": chosen}, source)[0].messages[:-1]  # Alpaca's prompt, validated
    return _checked(prompt, chosen, rejected, source)


BUILDERS = {"pairs": _pairs_build, "ranking": _ranking_build}


# ---------------------------------------------------------------- public readers


def read_preferences(path, fmt: str = "auto", skip_invalid: bool = False) -> ReadResult:
    """Every pair of a JSON list or JSONL file, as validated PreferencePairs."""
    path = Path(path)
    _require_exists(path)
    if fmt == "auto":
        fmt = detect_preference_format(path)
        if fmt is None:
            raise DataError(path, "file", "not preference data: expected records with chosen and rejected (and "
                                          "conversations, messages or prompt), or an instruction with an output "
                                          "list of replies, best first")
    elif fmt not in PREFERENCE_FORMATS:
        raise HuayuError(f"unknown preference format {fmt!r}; supported: auto, {', '.join(PREFERENCE_FORMATS)}")
    records, skipped = _collect(path, _json_entries(path), BUILDERS[fmt], skip_invalid)
    return ReadResult(records, skipped, fmt, str(path))


def read_preference_files(paths: list[str], skip_invalid: bool, report=print) -> list[PreferencePair]:
    """The pairs of every file in `paths` (each file's format detected); skips reported per file."""
    pairs = []
    for path in paths:
        result = read_preferences(path, skip_invalid=skip_invalid)
        if result.skipped:
            report(f"{path}: skipped {result.skipped:,} invalid records (--skip-invalid)")
        pairs += result.records
    return pairs


# ---------------------------------------------------------------- encoding and batches


@dataclass
class PairExample:
    """Prompt + chosen reply and prompt + rejected reply, each an SFT example (loss on the reply)."""
    chosen: Example
    rejected: Example


class PairExamples(list):
    """Encoded pairs; `lengths` lets --group-by-length batch pairs of similar length together."""

    def lengths(self) -> list[int]:
        return [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in self]


def encode_pairs(tokenizer, family, pairs: list[PreferencePair], max_source_length: int, max_target_length: int,
                 report=print, split: str = "train") -> PairExamples:
    """The pairs encoded as `huayu sft` encodes a dialogue's last reply. How many were cut is
    reported; a pair whose replies are the same (from the start or once cut) prefers nothing and is
    dropped (counted: oaast_rm_zh.json has three)."""
    examples, cut, same = PairExamples(), 0, 0
    for pair in pairs:
        chosen, rejected = (family.encode_dialogue(tokenizer, pair.prompt + [{"role": "assistant", "content": reply}],
                                                   max_source_length, max_target_length, "last")
                            for reply in (pair.chosen, pair.rejected))
        cut += chosen.full_length > len(chosen.input_ids) or rejected.full_length > len(rejected.input_ids)
        if chosen.input_ids == rejected.input_ids:
            same += 1
            continue
        examples.append(PairExample(chosen, rejected))
    note = (f"{split}: {len(pairs):,} pairs -> {len(examples):,}; {cut:,} truncated to max source/target length "
            f"{max_source_length}/{max_target_length}")
    report(note + (f"; {same:,} dropped: their two replies are the same (once truncated)" if same else ""))
    return examples


def pair_collate(pad_id: int):
    """A batch of n pairs: the n chosen sequences, then the n rejected ones, right-padded together;
    `reply_labels` marks each reply's tokens (SFT labels). `labels` holds one entry per pair (1: the
    first reply is preferred), so the loop counts a batch's items in pairs, as it counts a
    classification batch's in examples."""
    import torch

    from huayu.data.batching import pad_collate

    pad = pad_collate(pad_id)

    def collate(pairs: list[PairExample]) -> dict:
        batch = pad([p.chosen for p in pairs] + [p.rejected for p in pairs])
        batch["reply_labels"] = batch.pop("labels")
        batch["labels"] = torch.ones(len(pairs), dtype=torch.long)
        return batch

    return collate
