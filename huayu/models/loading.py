"""Load a tokenizer and model from a preset name or any local Hugging Face model directory.

Both paths end in a plain transformers model, so every stage treats a user's downloaded
checkpoint and a freshly initialised preset the same way.
"""

from __future__ import annotations

from pathlib import Path

from huayu.errors import HuayuError
from huayu.models.families import all_presets, family_of, family_of_preset


def _is_model_dir(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").exists()


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer given explicitly, else the one saved with the model."""
    from transformers import AutoTokenizer

    source = tokenizer or model
    if not Path(source).is_dir():
        if family_of_preset(model) is not None and tokenizer is None:
            raise HuayuError(f"'{model}' is a preset: pass --tokenizer DIR (train one with "
                             "`huayu tokenizer train`)")
        raise HuayuError(f"tokenizer '{source}' is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise HuayuError(f"cannot load a tokenizer from '{source}': {exc}") from None
    if tok.eos_token is None and tok.sep_token is not None:  # BERT-vocab Chinese GPT-2 checkpoints
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:  # e.g. GPT-2: pad with eos; padded positions never carry loss
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, tokenizer, dtype=None, seed: int = 0):
    """A model from a local HF directory, or a freshly initialised preset sized to `tokenizer`."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars for tiny models are noise in huayu's output
    if _is_model_dir(spec):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
        model = family_of(config).auto().from_pretrained(spec, dtype=dtype)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise HuayuError(f"tokenizer has {len(tokenizer)} tokens but the model at '{spec}' "
                             f"has only {model.get_input_embeddings().num_embeddings} embeddings")
        return model
    family = family_of_preset(spec)
    if family is None:
        raise HuayuError(f"'{spec}' is neither a model directory (with config.json) nor a preset "
                         f"({', '.join(all_presets())})")
    from huayu.models.presets import decoder_config

    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = decoder_config(spec, len(tokenizer), special)
    torch.manual_seed(seed)
    model = family.auto().from_config(config)
    return model.to(dtype) if dtype is not None else model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
