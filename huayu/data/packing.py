"""Pre-training examples: documents tokenized, joined with EOS and cut into full-length blocks.

Packing wastes no compute on padding: every block but possibly the last is exactly `seq_len`
tokens. Records with a target (the GPT-3 seed's src_txt + tgt_txt) are packed the same way, with
the source tokens masked out of the loss so only the target is learned.
"""

from __future__ import annotations

from huayu.data.batching import IGNORE, Example
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
