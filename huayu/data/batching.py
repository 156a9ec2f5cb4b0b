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


def to_device(batch: dict, device) -> dict:
    """`batch` with its tensors on `device` (the model's): batches are built on the CPU."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
