"""Labelled text for sequence classification: reading TSV/CSV files and encoding BERT-style inputs.

Shared by `huayu finetune-cls` (training, evaluation, prediction) and `huayu predict`, so a text
is encoded, and its predictions written, the same way when a classifier learns and when it is deployed: `[CLS] text [SEP]`,
where a tokenizer without BERT's tokens uses its bos and eos (huayu's own `<s>` and `</s>`).
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from huayu.data.chat import plain_ids
from huayu.errors import DataError, HuayuError

HEADERS = ("auto", "yes", "no")


@dataclass
class Labelled:
    texts: list[str] = field(default_factory=list)
    labels: list[str] | None = None      # None: the file has no label column
    skipped: int = 0


@dataclass
class ClassificationExample:
    input_ids: list[int]
    label: int = -1                      # -1: unlabelled (prediction only)


def _rows(path: str):
    """(line number, cells) of a TSV/CSV file, `.gz` or `-` (stdin); .csv is comma-separated, every
    other file tab-separated. A plain text file is one text a line (one cell)."""
    from huayu.data.formats import open_text

    name = "stdin" if path == "-" else Path(path).name.lower().removesuffix(".gz")
    handle = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig") if path == "-" else open_text(path)
    delimiter = "," if name.endswith(".csv") else "\t"
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as exc:
            raise DataError(path, f"line {reader.line_num}", f"not valid {'CSV' if delimiter == ',' else 'TSV'}: {exc}") from None


def _column(spec: str, header: list[str] | None, path: str, what: str) -> int:
    """The index of column `spec`: a name in the header, or a 0-based number."""
    if spec.isdigit():
        return int(spec)
    if header is None:
        raise DataError(path, "line 1", f"the file has no header line, so the {what} column must be given as a "
                                        f"0-based number (--{what}-column 0), not '{spec}'")
    if spec not in header:
        raise DataError(path, "line 1", f"no {what} column '{spec}' in the header ({', '.join(header)}); "
                                        f"name it with --{what}-column")
    return header.index(spec)


def read_labelled(path: str, text_column: str = "text", label_column: str | None = "label",
                  header: str = "auto", skip_invalid: bool = False, labels_optional: bool = False) -> Labelled:
    """Texts (and labels, unless `label_column` is None) of a TSV/CSV file; `labels_optional`: a
    header without the label column means the file has no labels (a test set's layout).

    header "auto": the first line is a header when it names the text column. A headerless file
    of two columns is read as `text, label` (ChnSentiCorp's layout), of one column as texts."""
    if header not in HEADERS:
        raise HuayuError(f"--header must be one of {', '.join(HEADERS)}, got '{header}'")
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(path, "file", "no rows")
    # auto: a header names the text column; with columns given by number, --header yes says there is one
    has_header = header == "yes" or (header == "auto" and not text_column.isdigit() and text_column in first[1])
    names = first[1] if has_header else None
    if names is None and not text_column.isdigit():  # the conventional layouts of a headerless file
        text_column, label_column = "0", ("1" if label_column is not None and len(first[1]) >= 2 else None)
    if labels_optional and names is not None and label_column is not None and not label_column.isdigit() \
            and label_column not in names:
        label_column = None
    t = _column(text_column, names, path, "text")
    lab = _column(label_column, names, path, "label") if label_column is not None else None
    out = Labelled(labels=[] if lab is not None else None)
    for line, cells in rows if has_header else _chain(first, rows):
        text = cells[t].strip() if t < len(cells) else ""
        label = cells[lab].strip() if lab is not None and lab < len(cells) else ""
        reason = ("no text" if not text else "no label" if lab is not None and not label else None)
        if reason:
            if not skip_invalid:
                raise DataError(path, f"line {line}", f"{reason} (expected {max(t, lab or 0) + 1} columns, got "
                                                      f"{len(cells)}); pass --skip-invalid to skip such rows")
            out.skipped += 1
            continue
        out.texts.append(text)
        if out.labels is not None:
            out.labels.append(label)
    if not out.texts:
        raise DataError(path, "file", "no valid rows")
    return out


def _chain(first, rows):
    yield first
    yield from rows


def boundary_ids(tokenizer) -> tuple[int, int]:
    """(cls, sep): BERT's [CLS] and [SEP], or bos and eos for tokenizers without them."""
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls is None or sep is None:
        raise HuayuError("the tokenizer has neither [CLS]/[SEP] nor bos/eos tokens to delimit an encoder's input")
    return cls, sep


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """`[CLS] text [SEP]` ids of every text, the text truncated to fit `max_length` tokens."""
    cls, sep = boundary_ids(tokenizer)
    return [[cls, *ids[:max_length - 2], sep] for ids in plain_ids(tokenizer, texts)]


def label_vocabulary(labels: list[str]) -> list[str]:
    """The classes in a stable order: numerically when every label is a number, else sorted."""
    distinct = set(labels)
    return sorted(distinct, key=lambda s: (float(s), s)) if all(_is_number(s) for s in distinct) else sorted(distinct)


def check_known_labels(data: Labelled, classes: list[str], path: str, whose: str) -> None:
    """Every gold label of `data` is one of `classes` (those `whose` knows)."""
    unknown = sorted(set(data.labels or []) - set(classes))
    if unknown:
        raise DataError(path, "label column", f"labels {', '.join(unknown[:5])} are not classes of {whose} "
                                              f"({', '.join(classes)})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def classification_collate(pad_id: int):
    """Right-padded input_ids, attention_mask and token_type_ids (one segment), plus labels when
    the examples carry them."""
    import torch

    def collate(examples: list[ClassificationExample]) -> dict:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, :len(e.input_ids)] = torch.as_tensor(e.input_ids)
            mask[row, :len(e.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        if all(e.label >= 0 for e in examples):
            batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    return collate


# --------------------------------------------------------------------------- inference (finetune-cls --test, predict)

Logits = Callable[[dict], "np.ndarray"]  # a padded batch (classification_collate's tensors) -> logits


def text_examples(tokenizer, texts: list[str], max_length: int) -> list[ClassificationExample]:
    """Unlabelled `[CLS] text [SEP]` examples of `texts`."""
    return [ClassificationExample(ids) for ids in encode_texts(tokenizer, texts, max_length)]


def length_sorted_batches(examples: list, collate, batch_size: int):
    """(indices into `examples`, padded batch) with the examples sorted by length, so that a batch pads little."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, collate([examples[i] for i in chunk])


def torch_logits(model) -> Logits:
    """The Logits function of a PyTorch classifier (no gradients, fp32 numpy out)."""
    import torch

    def logits(batch: dict) -> "np.ndarray":
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()

    return logits


def softmax(logits: "np.ndarray") -> "np.ndarray":
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def predict_probabilities(logits: Logits, examples: list, collate, num_labels: int,
                          batch_size: int) -> "np.ndarray":
    """Class probabilities of `examples` (text_examples, or a cloze's), one row each in input order."""
    from tqdm.auto import tqdm

    probs = np.zeros((len(examples), num_labels), dtype=np.float32)
    with tqdm(total=len(examples), desc="predict", unit="seq", file=sys.stderr, dynamic_ncols=True) as bar:
        for chunk, batch in length_sorted_batches(examples, collate, batch_size):
            probs[chunk] = softmax(logits(batch))
            bar.update(len(chunk))
    return probs


def write_predictions(out: str | None, classes: list[str], probs: "np.ndarray", data: Labelled,
                      source: str) -> list[str]:
    """`label<TAB>probability<TAB>text` per text, in input order, to `out` (None: stdout); with gold
    labels, the accuracy on stderr. Returns the predicted labels."""
    best = probs.argmax(axis=1)
    predicted = [classes[i] for i in best]
    lines = "".join(f"{label}\t{probs[row, i]:.4f}\t{_one_line(text)}\n"
                    for row, (label, i, text) in enumerate(zip(predicted, best, data.texts)))
    if out:
        Path(out).write_text(lines, encoding="utf-8")
        print(f"wrote {len(predicted)} predictions of {source} to {out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
    if data.labels is not None:
        correct = sum(p == g for p, g in zip(predicted, data.labels))
        print(f"{source}: accuracy {correct / len(predicted):.4f} ({correct}/{len(predicted)})", file=sys.stderr)
    return predicted


def _one_line(text: str) -> str:
    """A text as one TSV cell (a quoted CSV cell may hold tabs and line breaks)."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
