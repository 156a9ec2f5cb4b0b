"""Readers for every supported data format, all producing the same two record shapes.

Training, evaluation and the CLI only ever see `Dialogue` (role/content messages) or `TextRecord`
(continuation text, optionally with a target), so adding a format means adding a reader here and
nothing else. Every reader turns its file into `(where, raw)` entries and hands them to one
collector, which is the only place deciding what happens to a malformed record: a `DataError`
naming the file, the line or record and the reason, or (with `skip_invalid`) a counted skip.
Nothing is dropped silently.

Tool calling (huayu/tools.py, docs/tools.md): sharegpt's `function_call` / `observation` turns and
OpenAI's assistant `tool_calls` / `tool` messages both become assistant messages with `tool_calls`
and `tool` messages; a record's `tools` (or, as GLM-4 writes them, a message's) ride on the
dialogue's first message.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import yaml

from huayu.data.templates import ROLES
from huayu.errors import DataError, HuayuError
from huayu.tools import function_tools, tool_call, with_tools

DIALOGUE_FORMATS = ("eva", "conversation", "alpaca", "sharegpt", "kdconv", "chatterbot")
COLUMNS_FORMAT = "columns"  # any JSON/JSONL with --prompt-column/--response-column (e.g. ADGEN)
TEXT_FIELDS = ("text", "src_txt", "content")  # read_texts' auto text field, in order of preference
CALL = "function_call"  # sharegpt's role of an assistant turn whose text is a call's JSON
DEFAULT_ROLE_MAP = {
    "user": "user", "assistant": "assistant", "system": "system", "tool": "tool",
    "human": "user", "gpt": "assistant", "bot": "assistant", "observation": "tool", CALL: CALL,
}
CORPUS_SUFFIXES = (".txt", ".json", ".jsonl", ".gz")  # files read_texts takes from a directory


@dataclass
class Dialogue:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], see above
    source: str  # "path:line N" or "path:record N", for error messages


@dataclass
class TextRecord:
    text: str  # continuation text (or the source/input text)
    target: str | None  # None => continuation training; str => input->output training
    source: str


@dataclass
class ReadResult:
    records: list  # list[Dialogue] or list[TextRecord]
    skipped: int  # invalid records skipped (only with skip_invalid=True)
    format: str  # detected format name
    path: str


class _Invalid(Exception):
    """A record breaking its format; `_collect` turns it into a DataError or a counted skip."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


Entries = Iterable[tuple[str, object]]  # (where, raw record or _Invalid)
Builder = Callable[[object, str], list]  # (raw record, source) -> records


# ---------------------------------------------------------------- files


def open_text(path):
    """Open a UTF-8 text file for reading, decompressing `.gz` transparently.

    `utf-8-sig` also drops the byte-order mark Windows editors put at the start of files.
    """
    return _open(path, "rt", encoding="utf-8-sig")


def _open(path, mode: str, **kwargs):
    """Open a file or its `.gz`; a missing path is the most common user error, so it is a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file", "no such file")
    if path.is_dir():
        raise DataError(path, "file", "is a directory, expected a file")
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, mode, **kwargs)
    return open(path, mode, **kwargs)


def _lines(path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its line break); bad bytes become a DataError.

    Lines are decoded one by one (not by the text layer, which decodes in chunks) so an encoding
    error names the exact line.
    """
    lineno = 0
    try:
        with _open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"line {lineno}", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(path, f"line {lineno + 1}", f"cannot read: {exc}") from None


def _read_all(path) -> str:
    return "\n".join(line for _, line in _lines(path))


def _first_char(path) -> str:
    """The first non-blank character: '[' means a JSON list, '{' JSONL, anything else plain text."""
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


def _kind(path: Path) -> str | None:
    """'txt', 'json' or 'yaml' from the file name (ignoring .gz), else None."""
    name = path.name.lower().removesuffix(".gz")
    suffix = name[name.rfind("."):] if "." in name else ""
    return {".txt": "txt", ".json": "json", ".jsonl": "json", ".yml": "yaml", ".yaml": "yaml"}.get(suffix)


def _is_json(path: Path) -> bool:
    return _kind(path) == "json" or (_kind(path) is None and _first_char(path) in ("[", "{"))


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file", "no such file")


# ---------------------------------------------------------------- raw entries


def _json_entries(path, unit: str = "record") -> Iterator[tuple[str, object]]:
    """Records of a JSON list ("record N", or `unit` N) or of a JSONL file ("line N").

    A JSONL line that is not JSON is one invalid record; a broken JSON list cannot be split into
    records, so it is always an error. Blank JSONL lines separate nothing and are ignored.
    """
    if _first_char(path) == "[":
        try:
            data = json.loads(_read_all(path))
        except json.JSONDecodeError as exc:
            raise DataError(path, f"line {exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield from ((f"{unit} {n}", item) for n, item in enumerate(data, 1))
        return
    for lineno, line in _lines(path):
        if line.strip():
            yield f"line {lineno}", _parse_json_line(line)


def _parse_json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return _Invalid(f"invalid JSON: {exc.msg} (column {exc.colno})")


def _eva_entries(path) -> Iterator[tuple[str, object]]:
    """Lines of an EVA text file. A blank line in the middle is an invalid sample (usually a turn
    broken by a stray newline); blank lines at the end of the file are what editors leave."""
    blanks: list[int] = []
    for lineno, line in _lines(path):
        if not line.strip():
            blanks.append(lineno)
            continue
        yield from ((f"line {n}", "") for n in blanks)
        blanks.clear()
        yield f"line {lineno}", line


def _yaml_entries(path) -> Iterator[tuple[str, object]]:
    """Conversations of a chatterbot-corpus YAML file, each located by the line it starts on.

    BaseLoader keeps every scalar as the text written in the file ('1963', 'yes', '3.10'), which is
    what an utterance is; the safe loader would turn them into numbers and booleans.
    """
    loader = yaml.BaseLoader(_read_all(path))
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise DataError(path, where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError(path, "file", "expected a mapping with a 'conversations' list (chatterbot-corpus YAML)")
    items = next(value for key, value in node.value if key.value == "conversations").value
    for item, conversation in zip(items, data["conversations"]):
        yield f"line {item.start_mark.line + 1}", conversation


def _peek(entries: Entries) -> tuple[str, dict | None, Entries]:
    """The first record that is a JSON object (to detect a format or field), and all entries again."""
    seen = []
    for where, raw in entries:
        seen.append((where, raw))
        if isinstance(raw, dict):
            return where, raw, chain(seen, entries)
    return "file", None, seen


# ---------------------------------------------------------------- validation helpers


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _text(value, label: str) -> str:
    """A non-empty string, or the reason it is not one (`label` says where it sits in the record)."""
    if not isinstance(value, str):
        raise _Invalid(f"{label}: expected text, got {_type_name(value)}")
    if not value.strip():
        raise _Invalid(f"{label}: empty text")
    return value


def _message(role: str, content, label: str) -> dict[str, str]:
    return {"role": role, "content": _text(content, label)}


def _object(raw) -> dict:
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a JSON object, got {_type_name(raw)}")
    return raw


def _keys(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _required(record: dict, key: str):
    if key not in record:
        raise _Invalid(f"missing key {key!r} (keys: {_keys(record)})")
    return record[key]


def _optional_text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"{key}: expected text, got {_type_name(value)}")
    return value or ""


def _system_messages(record: dict) -> list[dict[str, str]]:
    system = _optional_text(record, "system")
    return [{"role": "system", "content": system}] if system.strip() else []


def _dialogue(messages: list[dict[str, str]], source: str) -> Dialogue:
    """The last check every reader shares: a dialogue without an assistant turn teaches nothing."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("no assistant message")
    return Dialogue(messages, source)


def _alternating(turns: list[str], start_with_user: bool = False) -> list[dict[str, str]]:
    """Roles for formats without speaker labels: speakers alternate, counted back from the last turn
    (the reply, so `assistant`) or, for chatterbot, forward from a first `user` turn."""
    if start_with_user:
        roles = [("user", "assistant")[i % 2] for i in range(len(turns))]
    else:
        roles = [("assistant", "user")[(len(turns) - 1 - i) % 2] for i in range(len(turns))]
    return [{"role": role, "content": turn} for role, turn in zip(roles, turns)]


def _map_role(raw, role_map: dict[str, str], label: str) -> str:
    if raw is None:
        raise _Invalid(f"{label}: missing role")
    role = role_map.get(raw, role_map.get(raw.lower())) if isinstance(raw, str) else None
    if role is None:
        raise _Invalid(f"{label}: unknown role {raw!r}; map it with --role-map {raw}=user (or assistant/system/tool)")
    return role


# ---------------------------------------------------------------- record builders


def _eva_build(raw: str, source: str) -> list[Dialogue]:
    turns = raw.split("\t")
    if len(turns) < 2:
        raise _Invalid(("blank line: " if not raw else "") + "needs at least 2 tab-separated turns")
    texts = [_text(turn, f"turn {i}") for i, turn in enumerate(turns, 1)]
    return [Dialogue(_alternating(texts), source)]


def _chatterbot_build(raw, source: str) -> list[Dialogue]:
    if not isinstance(raw, list):
        raise _Invalid(f"expected a list of utterances, got {_type_name(raw)}")
    if len(raw) < 2:
        raise _Invalid("needs at least 2 utterances")
    texts = [_text(u, f"utterance {i}") for i, u in enumerate(raw, 1)]
    return [Dialogue(_alternating(texts, start_with_user=True), source)]


def _chat_builder(list_keys: tuple[str, ...], role_map: dict[str, str]) -> Builder:
    """conversation/sharegpt: a list of speaker-labelled turns under one of `list_keys`, the tools
    under the record's `tools` or a turn's."""

    def build(raw, source: str) -> list[Dialogue]:
        record = _object(raw)
        key = next((k for k in list_keys if k in record), None)
        if key is None:
            raise _Invalid(f"missing key {' or '.join(map(repr, list_keys))} (keys: {_keys(record)})")
        turns = record[key]
        if not isinstance(turns, list):
            raise _Invalid(f"{key}: expected a list of turns, got {_type_name(turns)}")
        messages = _system_messages(record)
        for i, turn in enumerate(turns, 1):
            message = _chat_turn(turn, f"turn {i}", role_map)
            if message["role"] == "tool" and (not messages or messages[-1]["role"] not in ("assistant", "tool")):
                raise _Invalid(f"turn {i}: a tool result must answer an assistant turn (its call)")
            messages.append(message)
        return [_dialogue(with_tools(messages, _tools(record, turns)), source)]

    return build


def _chat_turn(turn, label: str, role_map: dict[str, str]) -> dict:
    """One turn as {"role", "content"} or sharegpt's {"from", "value"}; an assistant turn with
    OpenAI's `tool_calls`, or a sharegpt `function_call` turn, as a message with calls."""
    if not isinstance(turn, dict):
        raise _Invalid(f"{label}: expected an object with role and content, got {_type_name(turn)}")
    role = _map_role(turn.get("role", turn.get("from")), role_map, label)
    content = turn.get("content", turn.get("value"))
    if role == CALL:
        return {"role": "assistant", "content": "", "tool_calls": _calls(_json_text(content, label), label)}
    if role == "assistant" and turn.get("tool_calls"):
        return {"role": "assistant", "content": _optional_text(turn, "content"),
                "tool_calls": _calls(turn["tool_calls"], label)}
    return _message(role, content, label)


def _json_text(value, label: str):
    try:
        return json.loads(_text(value, label))
    except json.JSONDecodeError as exc:
        raise _Invalid(f"{label}: a function_call turn must hold a call's JSON: {exc.msg} (column {exc.colno})")


def _calls(raw, label: str) -> list[dict]:
    """One call or a list of them (parallel calls), each in huayu's or OpenAI's form."""
    try:
        return [tool_call(c) for c in (raw if isinstance(raw, list) else [raw])]
    except ValueError as exc:
        raise _Invalid(f"{label}: {exc}") from None


def _tools(record: dict, turns: list) -> list[dict]:
    """The record's `tools` (a list, or glaive's JSON text of one), or a turn's (GLM-4's data)."""
    given = [(key, value) for key, value in [("tools", record.get("tools"))] + [
        (f"turn {i} tools", t.get("tools")) for i, t in enumerate(turns, 1)] if value]
    if len(given) > 1:
        raise _Invalid(f"tools given twice: {given[0][0]} and {given[1][0]}")
    try:
        return function_tools(given[0][1]) if given else []
    except ValueError as exc:
        raise _Invalid(f"{given[0][0]}: {exc}") from None


def _alpaca_build(raw, source: str) -> list[Dialogue]:
    record = _object(raw)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _Invalid(f"history: expected a list of [question, answer] pairs, got {_type_name(history)}")
    messages = _system_messages(record)
    for i, pair in enumerate(history, 1):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _Invalid(f"history {i}: expected a [question, answer] pair")
        messages += [_message("user", pair[0], f"history {i} question"),
                     _message("assistant", pair[1], f"history {i} answer")]
    _required(record, "instruction")  # may be empty when the input says it all, but must be there
    parts = (_optional_text(record, "instruction"), _optional_text(record, "input"))
    prompt = "\n".join(part for part in parts if part.strip())
    messages += [_message("user", prompt, "instruction and input"),
                 _message("assistant", _required(record, "output"), "output")]
    return [_dialogue(messages, source)]


def _columns_builder(prompt_column: str, response_column: str) -> Builder:
    """Prompt from one column, or from several ("title,desc": their texts joined by newlines, as the
    T5 chat recipe turns title + description into the input); the response from one column."""
    prompt_columns = [c for c in prompt_column.split(",") if c]

    def build(raw, source: str) -> list[Dialogue]:
        record = _object(raw)
        prompt = "\n".join(str(_required(record, c)) for c in prompt_columns)
        return [Dialogue([_message("user", prompt, prompt_column),
                          _message("assistant", _required(record, response_column), response_column)], source)]

    return build


def _kdconv_builder(window: int | None) -> Builder:
    """One KdConv dialogue -> one sample per turn after the first, as in EVA's KdConv benchmark:
    the context is the preceding turns (the last `window` of them when set), the target the turn.
    A bad utterance invalidates the whole dialogue, so a skip is one dialogue."""

    def build(raw, source: str) -> list[Dialogue]:
        messages = _required(_object(raw), "messages")
        if not isinstance(messages, list):
            raise _Invalid(f"messages: expected a list, got {_type_name(messages)}")
        texts = [_kdconv_turn(m, f"turn {i}") for i, m in enumerate(messages, 1)]
        if len(texts) < 2:
            raise _Invalid("needs at least 2 messages")
        samples = []
        for t in range(1, len(texts)):
            start = max(0, t - window) if window else 0
            samples.append(Dialogue(_alternating(texts[start: t + 1]), f"{source} turn {t + 1}"))
        return samples

    return build


def _kdconv_turn(item, label: str) -> str:
    if not isinstance(item, dict):
        raise _Invalid(f"{label}: expected an object with a 'message', got {_type_name(item)}")
    return _text(item.get("message"), label)


def _text_builder(text_field: str, target_field: str) -> Builder:
    def build(raw, source: str) -> list[TextRecord]:
        record = _object(raw)
        text = _text(_required(record, text_field), text_field)
        target = record.get(target_field)
        return [TextRecord(text, None if target is None else _text(target, target_field), source)]

    return build


def _line_text_build(raw: str, source: str) -> list[TextRecord]:
    return [TextRecord(raw, None, source)]


# ---------------------------------------------------------------- collecting


def _collect(path, entries: Entries, build: Builder, skip_invalid: bool) -> tuple[list, int]:
    """Build records from raw entries: the one place an invalid record becomes an error or a skip."""
    records, skipped = [], 0
    for where, raw in entries:
        try:
            if isinstance(raw, _Invalid):
                raise raw
            records += build(raw, f"{path}:{where}")
        except _Invalid as exc:
            if not skip_invalid:
                raise DataError(path, where, exc.reason) from None
            skipped += 1
    return records, skipped


# ---------------------------------------------------------------- format detection


def detect_format(path) -> str:
    """The dialogue format of `path`, from its name and (for JSON) the first record's keys."""
    path = Path(path)
    _require_exists(path)
    if path.is_dir() or _kind(path) == "txt":
        return "eva"
    if _kind(path) == "yaml":
        return "chatterbot"
    if not _is_json(path):
        raise DataError(path, "file", f"cannot tell the format from the file name; {_format_hint()}")
    where, first, _ = _peek(_json_entries(path))
    if first is None:
        raise DataError(path, "file", "no JSON object records found")
    fmt = _format_from_keys(first)
    if fmt is None:
        raise DataError(path, where, f"cannot detect the format from keys ({_keys(first)}); {_format_hint(first)}")
    return fmt


def _format_from_keys(record: dict) -> str | None:
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "message" in messages[0]:
        return "kdconv"
    if "conversation" in record or "messages" in record:
        return "conversation"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return None


def _format_hint(record: dict | None = None) -> str:
    hint = f"supported formats: {', '.join(DIALOGUE_FORMATS)}; pass --format FORMAT"
    if record and {"prompt", "response"} <= record.keys():
        return hint + ", or --prompt-column prompt --response-column response"
    return hint + ", or --prompt-column C --response-column C for other JSON"


# ---------------------------------------------------------------- public readers


def read_dialogues(path, fmt: str = "auto", role_map: dict[str, str] | None = None, skip_invalid: bool = False,
                   split: str = "train", prompt_column: str | None = None, response_column: str | None = None,
                   window: int | None = None) -> ReadResult:
    """Read any supported dialogue/instruction file into validated `Dialogue`s.

    `role_map` adds source-role names (e.g. {"client": "user"}) to DEFAULT_ROLE_MAP; `split`
    picks the file of an EVA directory; `prompt_column`/`response_column` read any JSON/JSONL as
    one user/assistant pair per record; `window` limits KdConv contexts to their last N turns.
    """
    path = Path(path)
    _require_exists(path)
    fmt = _resolve_format(path, fmt, prompt_column, response_column)
    if fmt == "eva":
        path = _eva_file(path, split)
    entries, build = _dialogue_reader(path, fmt, _role_map(role_map), (prompt_column, response_column), window)
    records, skipped = _collect(path, entries, build, skip_invalid)
    return ReadResult(records, skipped, fmt, str(path))


def _resolve_format(path: Path, fmt: str, prompt_column: str | None, response_column: str | None) -> str:
    if (prompt_column is None) != (response_column is None):
        raise HuayuError("prompt_column and response_column (--prompt-column/--response-column) go together")
    if prompt_column is not None:
        if fmt not in ("auto", "alpaca", COLUMNS_FORMAT):
            raise HuayuError(f"prompt/response columns apply to JSON records, not to format {fmt!r}")
        return COLUMNS_FORMAT
    if fmt == COLUMNS_FORMAT:
        raise HuayuError("format 'columns' needs --prompt-column and --response-column")
    if fmt == "auto":
        return detect_format(path)
    if fmt not in DIALOGUE_FORMATS:
        raise HuayuError(f"unknown format {fmt!r}; supported formats: auto, {', '.join(DIALOGUE_FORMATS)}, columns")
    return fmt


def _role_map(extra: dict[str, str] | None) -> dict[str, str]:
    extra = extra or {}
    bad = {src: dst for src, dst in extra.items() if dst not in ROLES + (CALL,)}
    if bad:
        raise HuayuError(f"role map: {bad} maps to unknown roles; the roles are {', '.join(ROLES + (CALL,))}")
    return DEFAULT_ROLE_MAP | extra


def _eva_file(path: Path, split: str) -> Path:
    """EVA data is a directory of train/valid/test.txt, or one such file."""
    if not path.is_dir():
        return path
    for name in (f"{split}.txt", f"{split}.txt.gz"):
        if (path / name).is_file():
            return path / name
    raise DataError(path, "file", f"no {split}.txt in this EVA data directory (choose the split with --split)")


def _dialogue_reader(path: Path, fmt: str, role_map: dict[str, str], columns: tuple, window: int | None):
    if window is not None and (not isinstance(window, int) or window < 1):
        raise HuayuError(f"window must be a positive number of turns, got {window!r}")
    readers = {
        "eva": lambda: (_eva_entries(path), _eva_build),
        "chatterbot": lambda: (_yaml_entries(path), _chatterbot_build),
        "kdconv": lambda: (_json_entries(path, unit="dialogue"), _kdconv_builder(window)),
        "conversation": lambda: (_json_entries(path), _chat_builder(("conversation", "messages"), role_map)),
        "sharegpt": lambda: (_json_entries(path), _chat_builder(("conversations",), role_map)),
        "alpaca": lambda: (_json_entries(path), _alpaca_build),
        COLUMNS_FORMAT: lambda: (_json_entries(path), _columns_builder(*columns)),
    }
    return readers[fmt]()


def read_texts(path, text_field: str | None = None, target_field: str = "tgt_txt",
               skip_invalid: bool = False) -> ReadResult:
    """Read a pre-training corpus: `.txt` (one document per non-blank line) or JSON/JSONL with a text
    field (auto: the first of TEXT_FIELDS in the first record); a record carrying `target_field`
    becomes an input->output pair. A directory means all its corpus files, in name order."""
    path = Path(path)
    _require_exists(path)
    records, skipped = [], 0
    for file in _corpus_files(path):
        entries, build = _text_reader(file, text_field, target_field)
        file_records, file_skipped = _collect(file, entries, build, skip_invalid)
        records += file_records
        skipped += file_skipped
    return ReadResult(records, skipped, "text", str(path))


def _corpus_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(CORPUS_SUFFIXES))
    if not files:
        raise DataError(path, "file", "no .txt/.json/.jsonl(.gz) files in this directory")
    return files


def _text_reader(path: Path, text_field: str | None, target_field: str) -> tuple[Entries, Builder]:
    if not _is_json(path):
        return ((f"line {n}", line) for n, line in _lines(path) if line.strip()), _line_text_build
    where, first, entries = _peek(_json_entries(path))
    if text_field is None and first is not None:
        text_field = next((f for f in TEXT_FIELDS if f in first), None)
        if text_field is None:
            raise DataError(path, where, f"no text field among {', '.join(TEXT_FIELDS)} (keys: {_keys(first)}); "
                                         "name it with --text-field")
    return entries, _text_builder(text_field or TEXT_FIELDS[0], target_field)


# ---------------------------------------------------------------- helpers for consumers


def dialogue_origin(source: str) -> str:
    """The record a sample came from: KdConv samples "path:dialogue 3 turn 5" -> "path:dialogue 3".

    Samples of one origin share context turns, so splits keep them together and text counts
    count their turns once."""
    head, sep, tail = source.rpartition(" turn ")
    return head if sep and tail.isdigit() else source


def dialogue_texts(result: ReadResult) -> Iterator[str]:
    """Every piece of text in a ReadResult, once (e.g. to train a tokenizer); tools and calls as the
    JSON templates write them.

    A sample expanded from a dialogue repeats the earlier samples' turns as context, so after the
    first sample of an origin only its new, final turn is yielded.
    """
    previous = None
    for record in result.records:
        if isinstance(record, TextRecord):
            yield record.text
            if record.target is not None:
                yield record.target
            continue
        origin = dialogue_origin(record.source)
        messages = record.messages[-1:] if origin == previous and origin != record.source else record.messages
        for m in messages:
            yield m["content"]
            yield from (json.dumps(x, ensure_ascii=False) for x in m.get("tools", []) + m.get("tool_calls", []))
        previous = origin
