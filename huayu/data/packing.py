"""Packing: no compute spent on padding.

Pre-training: documents tokenized, joined with EOS and cut into full-length blocks; every block but
possibly the last is exactly `seq_len` tokens. Records with a target (the GPT-3 seed's src_txt +
tgt_txt) are packed the same way, with the source tokens masked out of the loss.

Fine-tuning (`huayu sft --packing`): whole examples are put into rows of at most `seq_len` tokens
by best-fit decreasing, and kept apart within a row (huayu.data.batching.PackedBatch): each attends
only to itself, its positions restart at 0, and its labels are its own, its first one dropped as an
unpacked causal LM drops it. The loss is then exactly the unpacked loss, with no padding.
"""

from __future__ import annotations

from collections.abc import Sequence

from huayu.data.batching import IGNORE, Example, PackedRow, example_lengths
from huayu.data.chat import plain_ids
from huayu.data.formats import TextRecord


def tokenize_records(tokenizer, records: list[TextRecord], batch: int = 1000):
    """Yield (ids, labels) per record, each ending in EOS; sources of src/tgt pairs carry no loss.
    A document's text is plain text: "</s>" in it is not the end of a document."""
    eos = tokenizer.eos_token_id
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        texts = plain_ids(tokenizer, [r.text for r in chunk])
        target_ids = iter(plain_ids(tokenizer, [r.target for r in chunk if r.target is not None]))
        for record, ids in zip(chunk, texts):
            if record.target is None:
                yield ids + [eos], ids + [eos]
            else:
                tgt = next(target_ids) + [eos]
                yield ids + tgt, [IGNORE] * len(ids) + tgt


def pack(pairs, seq_len: int) -> list[Example]:
    """Concatenate (ids, labels) pairs and cut them into blocks of `seq_len` tokens.

    The last block keeps whatever is left (it is shorter, never padded here), so no token is lost.
    """
    import numpy as np

    id_parts, label_parts = [], []
    for i, l in pairs:
        id_parts.append(np.asarray(i, dtype=np.int64))
        label_parts.append(np.asarray(l, dtype=np.int64))
    if not id_parts:
        return []
    ids, labels = np.concatenate(id_parts), np.concatenate(label_parts)
    return [Example(ids[s:s + seq_len], labels[s:s + seq_len]) for s in range(0, len(ids), seq_len)]


def best_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens: longest first, each into the
    fullest row it still fits (best-fit decreasing), a row's indices in order. Deterministic."""
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return [sorted(r) for r in rows]


class PackedExamples(Sequence):
    """`examples` packed into rows of at most `capacity` tokens, each row built when it is read."""

    def __init__(self, examples, capacity: int):
        lengths = example_lengths(examples)
        if lengths and max(lengths) > capacity:
            raise ValueError(f"an example of {max(lengths)} tokens cannot be packed into rows of {capacity}")
        self.examples, self.rows = examples, best_fit_rows(lengths, capacity)
        self.fill = sum(lengths) / max(len(self.rows) * capacity, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PackedRow:
        import numpy as np

        parts = [self.examples[i] for i in self.rows[index]]
        labels = [np.asarray(e.labels, dtype=np.int64).copy() for e in parts]
        for part in labels:
            part[0] = IGNORE  # predicted by the end of the sequence before it: an unpacked model never predicts it
        return PackedRow(np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in parts]),
                         np.concatenate(labels), np.concatenate([np.arange(len(e.input_ids)) for e in parts]),
                         len(parts))
