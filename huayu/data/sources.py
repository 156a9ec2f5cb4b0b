"""Reading several data files with one set of options, shared by every command that takes `--data`."""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import field_doc


@dataclass
class DialogueDataArgs:
    format: str = field_doc("data format: auto, eva, conversation, alpaca, sharegpt, kdconv, chatterbot",
                            default="auto")
    role_map: dict[str, str] = field_doc("map source roles, e.g. client=user,counselor=assistant",
                                         default_factory=dict)
    prompt_column: str | None = field_doc("column holding the prompt (ADGEN-style data)", default=None)
    response_column: str | None = field_doc("column holding the response", default=None)
    max_source_length: int = field_doc("max tokens of context (oldest turns are dropped first)", default=256)
    max_target_length: int = field_doc("max tokens of the reply", default=256)


def _report(skipped: int) -> None:
    if skipped:
        print(f"skipped {skipped} invalid records (--skip-invalid)")


def read_dialogue_files(paths: list[str], data: DialogueDataArgs, skip_invalid: bool, split: str = "train"):
    """Every dialogue in `paths`; `split` picks train/valid/test.txt in an EVA directory."""
    from huayu.data.formats import read_dialogues

    dialogues, skipped = [], 0
    for path in paths:
        result = read_dialogues(path, fmt=data.format, role_map=data.role_map or None,
                                skip_invalid=skip_invalid, split=split, prompt_column=data.prompt_column,
                                response_column=data.response_column)
        dialogues += result.records
        skipped += result.skipped
    _report(skipped)
    return dialogues


def read_text_files(paths: list[str], text_field: str | None, target_field: str, skip_invalid: bool):
    """Every text record in `paths` (continuation or input->output)."""
    from huayu.data.formats import read_texts

    records, skipped = [], 0
    for path in paths:
        result = read_texts(path, text_field=text_field, target_field=target_field, skip_invalid=skip_invalid)
        records += result.records
        skipped += result.skipped
    _report(skipped)
    return records
