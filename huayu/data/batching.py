"""Turning token-id examples into padded tensor batches."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label id that carries no loss


@dataclass
class Example:
    input_ids: list[int]  # or a 1-D integer array
    labels: list[int]
    full_length: int = 0  # length before any truncation (0: not truncated / not tracked)


def pad_collate(pad_id: int):
    """A collate function that right-pads input_ids/labels and builds the attention mask."""
    import torch

    def collate(examples: list[Example]) -> dict:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, :n] = torch.as_tensor(e.input_ids)
            labels[row, :n] = torch.as_tensor(e.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def seq2seq_collate(pad_id: int):
    """Encoder inputs and decoder labels padded separately (labels with IGNORE); the model builds
    its decoder inputs by shifting the labels right."""
    import torch

    def pad(rows: list, value: int):
        out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(r)
        return out

    def collate(examples: list[Example]) -> dict:
        ids = pad([e.input_ids for e in examples], pad_id)
        mask = pad([[1] * len(e.input_ids) for e in examples], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad([e.labels for e in examples], IGNORE)}

    return collate


def example_lengths(examples) -> list[int]:
    """The token count of each example (an Arrow-backed list reads them from its offsets)."""
    return examples.lengths() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]


@dataclass
class PackedRow:
    """Several examples in one row (huayu.data.packing): their ids and labels end to end, the
    position ids restarting at 0 with each."""
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    sequences: int


class PackedBatch(dict):
    """A batch of packed rows, as the model takes it: no attention mask, so that transformers finds
    the sequences from the restarting position ids and lets each attend only to itself (a
    block-diagonal causal mask; flash-attention's variable-length kernel on a GPU), and no cache,
    which would switch that detection off. `tokens` and `sequences` are what it holds, padding
    excluded."""
    tokens: int = 0
    sequences: int = 0


def packed_collate(pad_id: int):
    """Right-pads packed rows; a row's padding is a sequence of its own (positions from 0), which
    no real token attends to and which carries no loss."""
    import torch

    def collate(rows: list[PackedRow]) -> PackedBatch:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n], labels[i, :n] = torch.as_tensor(r.input_ids), torch.as_tensor(r.labels)
            positions[i, :n] = torch.as_tensor(r.position_ids)
            positions[i, n:] -= n
        batch = PackedBatch(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
        batch.tokens, batch.sequences = sum(len(r.input_ids) for r in rows), sum(r.sequences for r in rows)
        return batch

    return collate


def batch_counts(batch: dict) -> tuple[int, int]:
    """(sequences, tokens) a batch holds, padding excluded: what throughput is counted in."""
    if isinstance(batch, PackedBatch):
        return batch.sequences, batch.tokens
    return len(batch["input_ids"]), int(batch["attention_mask"].sum())


def to_device(batch: dict, device) -> dict:
    """`batch` with its tensors on `device` (the model's): batches are built on the CPU."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
