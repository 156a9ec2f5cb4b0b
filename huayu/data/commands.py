"""`huayu data inspect` and `huayu data convert`: check a data file before spending GPU hours on it,
and turn it into the format a recipe reads (e.g. KdConv JSON -> EVA text for the EVA benchmark).
Preference files (chosen/rejected pairs, huayu.data.preferences) are told apart by their keys: they
are inspected as pairs, split into held-out parts as pairs, or converted to their prompts with the
chosen replies as dialogues (SFT data)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

from huayu.data.formats import (COLUMNS_FORMAT, DIALOGUE_FORMATS, Dialogue, ReadResult, TextRecord,
                                dialogue_origin, read_dialogues)
from huayu.data.preferences import PREFERENCE_FORMATS, PreferencePair, detect_preference_format, read_preferences
from huayu.data.sources import read_corpus
from huayu.errors import HuayuError
from huayu.outputs import OVERWRITE_HELP, building, check_output_dir

DIALOGUE_CHOICES = ("auto", *DIALOGUE_FORMATS, COLUMNS_FORMAT)
SPLITS = ("train", "valid", "test")
CONVERT = "data convert"
SHOW_CHARS = 300  # a sample's turn is cut here when shown, so one long answer does not flood the terminal
_LINE_BREAKS = re.compile(r"[\t\r\n]+")
_REPLACED = "turns had tabs/newlines replaced by spaces"  # always reported for EVA output


# ---------------------------------------------------------------- argument types


def parse_role_map(text: str) -> dict[str, str]:
    """"client=user,counselor=assistant" -> {"client": "user", "counselor": "assistant"}."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(p.strip() for p in pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected SOURCE=ROLE[,SOURCE=ROLE...], got {text!r}")
    return {src.strip(): dst.strip() for src, dst in pairs}


def _split_ratio(text: str) -> tuple[float, float, float]:
    """"0.9,0.05,0.05" -> train/valid/test fractions (normalised, so "8,1,1" works too)."""
    try:
        ratio = tuple(float(x) for x in text.split(","))
    except ValueError:
        ratio = ()
    if len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers TRAIN,VALID,TEST, got {text!r}")
    return tuple(r / sum(ratio) for r in ratio)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


# ---------------------------------------------------------------- reading


def _add_reader_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    parser.add_argument("path", help="data file (.gz read transparently), EVA data directory, or with --format "
                                     "text a directory of corpus files (read with its subdirectories)")
    parser.add_argument("--format", default="auto", choices=formats,
                        help="input format (default: %(default)s, detected from the name and first record)")
    parser.add_argument("--role-map", type=parse_role_map, metavar="SRC=ROLE,...",
                        help="map source roles to user/assistant/system, e.g. client=user,counselor=assistant "
                             "(default: only user/assistant/system and human/gpt/bot are known)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records")
    parser.add_argument("--split", default="train",
                        help="which file of an EVA directory to read (default: %(default)s)")
    parser.add_argument("--prompt-column", help="read any JSON/JSONL as one prompt -> response pair per record")
    parser.add_argument("--response-column", help="the response field, with --prompt-column")
    parser.add_argument("--window", type=_int_at_least(1),
                        help="KdConv: keep only the last N context turns (default: all)")


def _read(args) -> ReadResult:
    if args.format == "text":
        return read_corpus(args.path, args.text_field, args.target_field, args.skip_invalid)
    preference = args.format if args.format in PREFERENCE_FORMATS else \
        detect_preference_format(args.path) if args.format == "auto" and args.prompt_column is None else None
    if preference:
        return read_preferences(args.path, preference, args.skip_invalid)
    return read_dialogues(args.path, args.format, args.role_map, args.skip_invalid, args.split,
                          args.prompt_column, args.response_column, args.window)


# ---------------------------------------------------------------- inspect


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _add_reader_arguments(parser, (*DIALOGUE_CHOICES, *PREFERENCE_FORMATS, "text"))
    parser.add_argument("--text-field", help="--format text: JSON field with the text (default: text/src_txt/content)")
    parser.add_argument("--target-field", default="tgt_txt",
                        help="--format text: JSON field with a target (default: %(default)s)")
    parser.add_argument("--show", type=_int_at_least(0), default=2,
                        help="how many samples to print (default: %(default)s)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a tokenizer or model directory: also count tokens and the share the tokenizer cannot "
                             "spell (unknown tokens), with the characters behind them")


def run_inspect(args) -> int:
    result = _read(args)
    lines = [f"path: {result.path}", f"format: {result.format}"]
    stats = _text_stats if args.format == "text" else \
        _pair_stats if result.format in PREFERENCE_FORMATS else _dialogue_stats
    lines += stats(result.records)
    if args.skip_invalid:
        lines.append(f"skipped (invalid): {result.skipped:,}")
    if args.tokenizer:
        lines += _token_stats(args.tokenizer, [text for r in result.records for text in _texts(r)])
    print("\n".join(lines))
    for n, record in enumerate(result.records[: args.show], 1):
        print(f"\n[{n}] {record.source}\n{_render(record)}")
    return 0


def _summary(values: list[int], parts: tuple[str, ...] = ("min", "mean", "max")) -> str:
    if not values:
        return "-"
    stats = {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}
    return " / ".join(f"{name} {stats[name]:,.1f}" if name == "mean" else f"{name} {stats[name]:,}" for name in parts)


def _dialogue_stats(records: list[Dialogue]) -> list[str]:
    turn_chars = [len(m["content"]) for d in records for m in d.messages]
    roles = Counter(m["role"] for d in records for m in d.messages)
    lines = [
        f"dialogues: {len(records):,}",
        f"turns per dialogue: {_summary([len(d.messages) for d in records])}",
        f"characters per turn: {_summary(turn_chars, ('mean', 'max'))}",
        "turns by role: " + ", ".join(f"{role} {count:,}" for role, count in sorted(roles.items())),
    ]
    with_tools = [d for d in records if d.messages and d.messages[0].get("tools")]
    calls = sum(len(m.get("tool_calls") or []) for d in records for m in d.messages)
    if with_tools or calls:
        names = Counter(t["function"]["name"] for d in with_tools for t in d.messages[0]["tools"])
        lines.append(f"tools: offered in {len(with_tools):,} dialogues ({len(names):,} distinct); "
                     f"{calls:,} tool calls")
    return lines


def _pair_stats(records: list[PreferencePair]) -> list[str]:
    """Counts, and how often the chosen reply is the longer one: a reward learned from pairs where it
    nearly always is may learn length rather than quality."""
    longer = sum(len(p.chosen) > len(p.rejected) for p in records)
    return [
        f"pairs: {len(records):,}",
        f"turns per prompt: {_summary([len(p.prompt) for p in records])}",
        "characters per prompt: " + _summary([sum(len(m["content"]) for m in p.prompt) for p in records],
                                             ("mean", "max")),
        f"characters per chosen reply: {_summary([len(p.chosen) for p in records], ('mean', 'max'))}",
        f"characters per rejected reply: {_summary([len(p.rejected) for p in records], ('mean', 'max'))}",
        f"chosen reply the longer one: {longer:,} of {len(records):,}" + (f" ({longer / len(records):.0%})"
                                                                          if records else ""),
    ]


def _text_stats(records: list[TextRecord]) -> list[str]:
    chars = [len(r.text) for r in records]
    return [
        f"documents: {len(records):,}",
        f"characters: {sum(chars):,}",
        f"characters per document: {_summary(chars)}",
        f"with target: {sum(r.target is not None for r in records):,}",
    ]


def _texts(record: Dialogue | TextRecord | PreferencePair) -> list[str]:
    if isinstance(record, TextRecord):
        return [record.text] + ([record.target] if record.target is not None else [])
    if isinstance(record, PreferencePair):
        return [m["content"] for m in record.prompt] + [record.chosen, record.rejected]
    return [m["content"] for m in record.messages]


UNKNOWN_WARN_SHARE = 0.01  # above this share of unknown tokens the tokenizer does not fit the data
TOKENIZE_BATCH = 1000


def _token_stats(tokenizer_dir: str, texts: list[str]) -> list[str]:
    """Token counts of `texts`, and how many are the tokenizer's unknown token: a vocabulary that
    lacks the data's characters (a Latin-only one on Chinese, rare hanzi) turns them into one <unk>
    the model cannot learn or say. Above UNKNOWN_WARN_SHARE, a warning names the commonest ones."""
    import sys

    from huayu.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    unk = tokenizer.unk_token_id
    total, unknown = 0, Counter()  # the text behind each unknown token, where the tokenizer gives offsets
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start:start + TOKENIZE_BATCH]
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False,
                            return_offsets_mapping=tokenizer.is_fast)
        for i, ids in enumerate(encoded["input_ids"]):
            total += len(ids)
            spans = encoded["offset_mapping"][i] if tokenizer.is_fast else [(0, 0)] * len(ids)
            unknown.update(batch[i][a:b] or "?" for t, (a, b) in zip(ids, spans) if t == unk)
    lines = [f"tokens ({tokenizer_dir}): {total:,}"]
    if unk is None:
        return lines + ["unknown tokens: none (the tokenizer has no unknown token)"]
    count = sum(unknown.values())
    share = count / total if total else 0.0
    lines.append(f"unknown tokens ({tokenizer.unk_token}): {count:,} ({share:.2%})")
    if share > UNKNOWN_WARN_SHARE:
        common = ", ".join(f"{text!r} {n:,}" for text, n in unknown.most_common(10))
        print(f"warning: {share:.2%} of the tokens are {tokenizer.unk_token} (above {UNKNOWN_WARN_SHARE:.0%}): the "
              f"tokenizer cannot spell this data; most common: {common}", file=sys.stderr)
    return lines


def _render(record: Dialogue | TextRecord | PreferencePair) -> str:
    if isinstance(record, TextRecord):
        pairs = [("text", record.text)] + ([("target", record.target)] if record.target is not None else [])
    elif isinstance(record, PreferencePair):
        pairs = [(m["role"], m["content"]) for m in record.prompt] + [("chosen", record.chosen),
                                                                      ("rejected", record.rejected)]
    else:
        pairs = [pair for m in record.messages for pair in _turn(m)]
    return "\n".join(f"  {name}: {_clip(text)}" for name, text in pairs)


def _turn(message: dict) -> list[tuple[str, str]]:
    """A message as (label, text) lines: its tools offered and its calls shown as well as its text."""
    lines = []
    if message.get("tools"):
        lines.append(("tools", ", ".join(t["function"]["name"] for t in message["tools"])))
    if message["content"] or not message.get("tool_calls"):
        lines.append((message["role"], message["content"]))
    lines += [(f"{message['role']} calls", f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})")
              for c in message.get("tool_calls") or []]
    return lines


def _clip(text: str) -> str:
    if len(text) > SHOW_CHARS:
        text = f"{text[:SHOW_CHARS]}… (+{len(text) - SHOW_CHARS:,} characters)"
    return text.replace("\n", "\n    ")


# ---------------------------------------------------------------- convert


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    _add_reader_arguments(parser, (*DIALOGUE_CHOICES, *PREFERENCE_FORMATS))
    parser.add_argument("--to", required=True, choices=("eva", "conversation", "text", "pairs"),
                        help="output format (text: one JSONL document per dialogue, its turns on lines, for "
                             "pre-training; pairs: preference pairs as JSONL {messages, chosen, rejected}; from "
                             "preference data the other formats hold each prompt with its chosen reply)")
    parser.add_argument("--out", required=True,
                        help="output file (an existing one is replaced only with --overwrite); with --split-ratio a "
                             "directory for train/valid/test files: new, empty, or an earlier split by data convert "
                             "(replaced)")
    parser.add_argument("--split-ratio", type=_split_ratio, metavar="TRAIN,VALID,TEST",
                        help="write train/valid/test files into --out, e.g. 0.9,0.05,0.05")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for --split-ratio (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing --out file; with --split-ratio, {OVERWRITE_HELP}")


def run_convert(args) -> int:
    out = Path(args.out)
    _check_convert_out(out, args.split_ratio is not None, args.overwrite)
    result = _read(args)
    notes: Counter = Counter()
    records = _convertible(result, args.to)
    encode = {"eva": _eva_line, "conversation": _conversation_line, "text": _text_line, "pairs": _pair_line}[args.to]
    samples = [(dialogue_origin(d.source), line) for d in records if (line := encode(d, notes)) is not None]
    kind = "pairs" if result.format in PREFERENCE_FORMATS else "dialogues"
    print(f"read {len(result.records):,} {kind} ({result.format}) from {result.path}"
          + (f"; skipped {result.skipped:,} invalid records" if args.skip_invalid else ""))
    if args.split_ratio is None:
        write_lines(out, [line for _, line in samples], hint=", or --split-ratio to write splits into it")
        print(f"wrote {len(samples):,} samples to {out}")
    else:
        suffix = ".txt" if args.to == "eva" else ".jsonl"
        parts = _split(samples, args.split_ratio, args.seed)
        _write_splits(out, {f"{name}{suffix}": lines for name, lines in parts.items()})
        print(f"wrote to {out}: " + ", ".join(f"{name}{suffix} {len(lines):,}" for name, lines in parts.items()))
    for note, count in notes.items():
        if count or note == _REPLACED:
            print(f"  {count:,} {note}")
    return 0


def _convertible(result: ReadResult, to: str) -> list:
    """The records to write as `to`: pairs as pairs, or a pair's prompt with its chosen reply as a
    dialogue (SFT on the preferred replies, the usual start of preference training)."""
    if result.format in PREFERENCE_FORMATS:
        return result.records if to == "pairs" else \
            [Dialogue(p.prompt + [{"role": "assistant", "content": p.chosen}], p.source) for p in result.records]
    if to == "pairs":
        raise HuayuError(f"--to pairs needs preference data (chosen/rejected pairs); {result.path} holds "
                         f"{result.format} dialogues")
    return result.records


def _check_convert_out(out: Path, split: bool, overwrite: bool) -> None:
    """Refuse, before the input is read, an --out holding something of the user's: an existing file
    unless --overwrite, or with --split-ratio a directory the output rule (huayu.outputs) refuses."""
    if split:
        check_output_dir(out, CONVERT, overwrite)
    elif out.is_file() and not overwrite:
        raise HuayuError(f"--out {out} exists: choose another file name, or pass --overwrite to replace it")


def _write_splits(out: Path, files: dict[str, list[str]]) -> None:
    """The split files, installed together (outputs.building): an earlier split is replaced whole (no
    file of another format left behind) and an interrupted run leaves none."""
    with building(out, CONVERT) as tmp:
        for name, lines in files.items():
            write_lines(tmp / name, lines)


def _eva_line(dialogue: Dialogue, notes: Counter) -> str | None:
    """One EVA sample: turns tab-joined, the last one the reply. EVA has no roles or system turns and
    infers speakers by alternation, so system turns are dropped, consecutive turns of one speaker
    merged and turns after the last assistant reply dropped -- each counted in `notes`."""
    _count_dropped_tools(dialogue, notes, "EVA")
    messages = [m for m in dialogue.messages if m["role"] not in ("system", "tool") and m["content"]]
    notes["system turns dropped (EVA has no system turn)"] += sum(m["role"] == "system" for m in dialogue.messages)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        notes["dialogues whose replies are only tool calls skipped"] += 1
        return None
    last = replies[-1]
    notes["user turns after the last reply dropped"] += len(messages) - 1 - last
    turns: list[str] = []
    for i, m in enumerate(messages[: last + 1]):
        text = _LINE_BREAKS.sub(" ", m["content"])
        notes[_REPLACED] += text != m["content"]
        if i and m["role"] == messages[i - 1]["role"]:
            turns[-1] += " " + text
            notes["consecutive same-speaker turns merged"] += 1
        else:
            turns.append(text)
    if len(turns) < 2:
        notes["dialogues without context before the reply skipped"] += 1
        return None
    return "\t".join(turns)


def _conversation_line(dialogue: Dialogue, notes: Counter) -> str:
    return json.dumps({"messages": dialogue.messages}, ensure_ascii=False)


def _pair_line(pair: PreferencePair, notes: Counter) -> str:
    """A pair as huayu.data.preferences reads it back: the prompt's turns under `messages`."""
    return json.dumps({"messages": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, ensure_ascii=False)


def _text_line(dialogue: Dialogue, notes: Counter) -> str:
    """A dialogue as a pre-training document: the turns' texts, one per line (system turns kept)."""
    _count_dropped_tools(dialogue, notes, "plain text")
    return json.dumps({"text": "\n".join(m["content"] for m in dialogue.messages if m["content"])}, ensure_ascii=False)


def _count_dropped_tools(dialogue: Dialogue, notes: Counter, into: str) -> None:
    """Tools, calls and tool results have no place in EVA's or plain text's format: said, not silent."""
    messages = dialogue.messages
    notes[f"tool lists dropped ({into} has no tools)"] += bool(messages and messages[0].get("tools"))
    notes[f"tool calls dropped ({into} has no tools)"] += sum(len(m.get("tool_calls") or []) for m in messages)
    notes[f"tool results dropped ({into} has no tools)"] += sum(m["role"] == "tool" for m in messages)


def _split(samples: list[tuple[str, str]], ratio: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """A seeded shuffle of origins, cut by `ratio`. Samples expanded from one dialogue stay in one
    split, so no test context was seen in training."""
    groups: dict[str, list[str]] = {}
    for origin, line in samples:
        groups.setdefault(origin, []).append(line)
    origins = list(groups)
    random.Random(seed).shuffle(origins)
    cut_train = round(len(origins) * ratio[0])
    cut_valid = round(len(origins) * (ratio[0] + ratio[1]))
    chosen = dict(zip(SPLITS, (origins[:cut_train], origins[cut_train:cut_valid], origins[cut_valid:])))
    return {name: [line for origin in keys for line in groups[origin]] for name, keys in chosen.items()}


def write_lines(path: Path, lines: list[str], hint: str = "") -> None:
    """Write through a temporary file and a rename, so an interrupted run never leaves a truncated
    file that looks complete."""
    if path.is_dir():
        raise HuayuError(f"--out {path} is a directory: give a file name{hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
