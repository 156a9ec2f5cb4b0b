"""`huayu metrics`: score a file of generated responses against a file of references.

Both conventions are reported by default, each under its own key, because EVA's and ChatGLM's
numbers for the same text differ and must never be compared across conventions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huayu.errors import DataError, HuayuError
from huayu.evaluation.metrics import adgen_metrics, dialogue_metrics

CONVENTION_CHOICES = ("eva", "adgen", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp", required=True, type=Path, help="generated responses, one per line")
    parser.add_argument("--ref", required=True, type=Path, help="reference responses, one per line")
    parser.add_argument("--convention", choices=CONVENTION_CHOICES, default="both",
                        help="eva: EVA's character metrics; adgen: ChatGLM's ADGEN metrics; both: "
                             'one JSON {"eva": ..., "adgen": ...} (default: both)')
    parser.add_argument("--eva-compat", action="store_true",
                        help="reproduce EVA's metric code exactly in the EVA block (see docs/metrics.md)")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON to this file")


def run(args: argparse.Namespace) -> None:
    hyps, refs = read_lines(args.hyp), read_lines(args.ref)
    _check_counts(args.hyp, len(hyps), args.ref, len(refs))
    report = json.dumps(score(hyps, refs, args.convention, args.eva_compat), ensure_ascii=False, indent=2)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n", encoding="utf-8")


def score(hyps: list[str], refs: list[str], convention: str, eva_compat: bool) -> dict:
    """One convention's scores as a flat dict (the pre-`--convention` output for eva), or both."""
    if eva_compat and convention == "adgen":
        raise HuayuError("--eva-compat changes EVA's metrics only; it has no effect with --convention adgen")
    blocks = {}
    if convention in ("eva", "both"):
        blocks["eva"] = dialogue_metrics(hyps, refs, eva_compat)
    if convention in ("adgen", "both"):
        blocks["adgen"] = adgen_metrics(hyps, refs)
    return blocks if convention == "both" else blocks[convention]


def read_lines(path: Path) -> list[str]:
    """One text per line; a blank line is an empty response, the final newline ends the last one.

    Splits on "\\n" only (not str.splitlines) so a U+2028 or form feed inside a response cannot
    shift every later line out of step with the other file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HuayuError(f"{path}: cannot read: {exc}") from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _check_counts(hyp_path: Path, n_hyps: int, ref_path: Path, n_refs: int) -> None:
    """Pairs are matched by line number, so the files must have the same, non-zero length."""
    if n_hyps == n_refs == 0:
        raise DataError(hyp_path, "line 1", f"no lines to score (and {ref_path} is empty too)")
    if n_hyps != n_refs:
        short_path = hyp_path if n_hyps < n_refs else ref_path
        raise DataError(short_path, f"line {min(n_hyps, n_refs) + 1}",
                        f"{hyp_path} has {n_hyps} lines but {ref_path} has {n_refs}; "
                        "each hypothesis line needs the reference on the same line number")
