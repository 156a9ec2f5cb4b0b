"""Reading several data files with one set of options, shared by every command that takes `--data`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huayu.config import field_doc


@dataclass
class DialogueDataArgs:
    format: str = field_doc("data format: auto, eva, conversation, alpaca, sharegpt, kdconv, chatterbot",
                            default="auto")
    role_map: dict[str, str] = field_doc("map source roles, e.g. client=user,counselor=assistant",
                                         default_factory=dict)
    prompt_column: str | None = field_doc("column holding the prompt (ADGEN-style data); several, comma-separated "
                                          "(title,desc), are joined by newlines", default=None)
    response_column: str | None = field_doc("column holding the response", default=None)
    max_source_length: int = field_doc("max tokens of context: the oldest turns are dropped first (a leading "
                                       "system message and the newest turns are kept)", default=256)
    max_target_length: int = field_doc("max tokens of the reply (the last assistant turn; cut at its end). When "
                                       "context + reply exceed --max-seq-length, each keeps at least half of it",
                                       default=256)


Report = Callable[[str], None]  # where a reader's report lines go (print, or a list's append to keep them)


def _report(skipped: int, report: Report) -> None:
    if skipped:
        report(f"skipped {skipped} invalid records (--skip-invalid)")


def read_dialogue_files(paths: list[str], data: DialogueDataArgs, skip_invalid: bool, split: str = "train",
                        report: Report = print):
    """Every dialogue in `paths`; `split` picks train/valid/test.txt in an EVA directory."""
    from huayu.data.formats import read_dialogues

    dialogues, skipped = [], 0
    for path in paths:
        result = read_dialogues(path, fmt=data.format, role_map=data.role_map or None,
                                skip_invalid=skip_invalid, split=split, prompt_column=data.prompt_column,
                                response_column=data.response_column)
        dialogues += result.records
        skipped += result.skipped
    _report(skipped, report)
    return dialogues


def read_text_files(paths: list[str], text_field: str | None, target_field: str, skip_invalid: bool,
                    report: Report = print):
    """Every text record in `paths` (continuation or input->output), a directory's files included."""
    records, skipped = [], 0
    for path in paths:
        result = read_corpus(path, text_field, target_field, skip_invalid, report)
        records += result.records
        skipped += result.skipped
    _report(skipped, report)
    return records


def read_corpus(path: str | Path, text_field: str | None, target_field: str, skip_invalid: bool,
                report: Report = print):
    """read_texts over every file of corpus_files(path), as one ReadResult."""
    from huayu.data.formats import ReadResult, read_texts

    results = [read_texts(file, text_field=text_field, target_field=target_field, skip_invalid=skip_invalid)
               for file in corpus_files(path, report)]
    return ReadResult([record for result in results for record in result.records],
                      sum(result.skipped for result in results), "text", str(path))


def corpus_files(path: str | Path, report: Report = print) -> list[Path]:
    """A file as itself; a directory as every corpus file (.txt/.json/.jsonl, .gz too) under it,
    subdirectories included, in path order so every machine reads them alike, and a report of how
    many. Hidden files and directories (.git, editors' backups) and huayu's output records (a data
    convert split is a corpus directory) are left out."""
    from huayu.data.formats import CORPUS_SUFFIXES
    from huayu.errors import DataError
    from huayu.outputs import OUTPUT_RECORD

    path = Path(path)
    if not path.is_dir():
        return [path]

    def is_corpus(file: Path) -> bool:
        hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
        return file.is_file() and file.name.lower().endswith(CORPUS_SUFFIXES) and file.name != OUTPUT_RECORD \
            and not hidden

    files = sorted(filter(is_corpus, path.rglob("*")))
    if not files:
        raise DataError(path, "file", "no .txt/.json/.jsonl(.gz) files in this directory or its subdirectories")
    report(f"{path}: {len(files)} corpus files (subdirectories included)")
    return files


def holds_dialogues(path: str) -> bool:
    """Whether `path` is dialogue/instruction data (read_dialogue_files) rather than a text corpus.

    `detect_format` takes every .txt file and directory for EVA data; EVA lines are tab-separated
    turns, the lines of a text corpus (one document each) are not."""
    from huayu.data.formats import detect_format
    from huayu.errors import DataError

    try:
        fmt = detect_format(path)
    except DataError:  # JSON without dialogue keys, or a missing path (reading it reports that)
        return False
    return fmt != "eva" or _tab_separated(Path(path))


def _tab_separated(path: Path) -> bool:
    """Whether the first non-blank line of an EVA file (or a directory's train.txt) has a tab."""
    from huayu.data.formats import open_text

    candidates = [path / "train.txt", path / "train.txt.gz"] if path.is_dir() else [path]
    for file in (c for c in candidates if c.is_file()):
        with open_text(file) as lines:
            return "\t" in next((line for line in lines if line.strip()), "")
    return False
