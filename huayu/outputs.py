"""Where a command may write: the one rule every command that writes a directory follows.

A command writes into a missing or empty directory, or into one that holds its own earlier output
of the same kind, recognised by the record it leaves there (OUTPUT_RECORD); each command documents
what it then does (training resumes or refuses, an export is replaced). Anything else is refused
unless the user passes --overwrite, and even then nothing already there is deleted: files of the
same name are replaced, the rest is left alone. A file given as the output directory is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huayu.errors import HuayuError

OUTPUT_RECORD = "huayu_output.json"
OVERWRITE_HELP = ("write into a non-empty output directory that is not an earlier output of this command "
                  "(files of the same name are replaced; nothing else is deleted)")


def output_owner(out: str | Path) -> str | None:
    """The command whose output `out` is, by its record; None for anything else."""
    try:
        return json.loads((Path(out) / OUTPUT_RECORD).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(out: str | Path, command: str, overwrite: bool = False, flag: str = "--out") -> bool:
    """Refuse `out` unless the rule allows `command` to write there; whether it holds an earlier
    output of `command` (which the caller then resumes or replaces as it documents)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HuayuError(f"{flag} '{out}' is a file, not a directory: choose a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    owner = output_owner(out)
    if owner == command:
        return True
    if not overwrite:
        whose = f"holds the output of `huayu {owner}`" if owner else "was not written by huayu"
        raise HuayuError(f"{flag} '{out}' is not empty and {whose}: choose a new or empty directory, or pass "
                         f"--overwrite to write `huayu {command}`'s files into it (files of the same name are "
                         "replaced, nothing else is deleted)")
    return False


def _foreign(out: Path, command: str) -> bool:
    """A non-empty directory that is not `command`'s (written into only with --overwrite)."""
    return out.is_dir() and any(out.iterdir()) and output_owner(out) != command


def _record(directory: Path, command: str) -> None:
    tmp = directory / f".tmp-{OUTPUT_RECORD}"
    tmp.write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")
    os.replace(tmp, directory / OUTPUT_RECORD)


def claim_output_dir(out: str | Path, command: str, overwrite: bool = False, flag: str = "--out") -> bool:
    """check_output_dir, then create `out` and record that `command` writes there — unless it is
    someone else's directory written into with --overwrite, which must never pass for huayu's own
    (a later run would replace it whole)."""
    own = check_output_dir(out, command, overwrite, flag)
    out = Path(out)
    foreign = _foreign(out, command)
    out.mkdir(parents=True, exist_ok=True)
    if not foreign:
        _record(out, command)
    return own


@contextmanager
def building(out: str | Path, command: str):
    """A temporary sibling directory to build `command`'s output in, installed at `out` (which
    check_output_dir has allowed) only when the block ends without an error and removed in any
    case: an interrupted or failed command never leaves a half-written output, and an earlier
    one stays until the new one is complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield built
        _install(built, out, command)
    finally:
        shutil.rmtree(built, ignore_errors=True)  # gone once installed


def _install(built: Path, out: Path, command: str) -> None:
    """Move a finished output to `out`: a missing or empty `out`, or an earlier output of
    `command`, is replaced whole; into any other directory (--overwrite) the entries are moved one
    by one, replacing same-named ones."""
    if _foreign(out, command):  # no record here: the directory stays its owner's
        (built / OUTPUT_RECORD).unlink(missing_ok=True)
        for entry in built.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        built.rmdir()
        return
    _record(built, command)
    if out.is_dir():
        shutil.rmtree(out)  # empty, or huayu's own earlier output of this command
    os.replace(built, out)
