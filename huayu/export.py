"""`huayu export merge`: fold a LoRA adapter into its base model; `huayu export reshard`: the same
model in safetensors shards of a chosen size.

A merge is a plain Hugging Face model (safetensors + tokenizer) that loads and decodes without
peft and with no adapter overhead, and gives the same outputs as base + adapter. Prefix adapters
add virtual tokens rather than weight deltas, so they have nothing to fold in.

Resharding is the modern form of EVA's `change_mp.py`: instead of re-cutting tensors for a model
parallel degree, the weights are written as shards of at most `--max-shard-size` with transformers'
`model.safetensors.index.json`, which every loader (huayu's stages, plain transformers, accelerate's
big-model loading) reads shard by shard. The dtype is kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.templates import TEMPLATE_RECORD
from huayu.errors import HuayuError

EXPORT_FILE = "huayu_export.yaml"


@dataclass
class MergeConfig:
    base: str = field_doc("base model directory the adapter was trained on", positional=True, default=None)
    adapter: str = field_doc("LoRA adapter directory (e.g. the output of huayu sft --finetuning-type lora)",
                             positional=True, default=None)
    out: str = field_doc("output directory (must not exist, or be empty)", default=None)


def check(cfg: MergeConfig) -> None:
    from huayu.models.loading import adapter_config

    if not (cfg.base and cfg.adapter and cfg.out):
        raise HuayuError("usage: huayu export merge BASE ADAPTER --out DIR")
    peft_type = adapter_config(cfg.adapter).get("peft_type")
    if peft_type != "LORA":
        raise HuayuError(f"'{cfg.adapter}' is a {peft_type} adapter, which cannot be merged: only LoRA adds weight "
                         f"deltas; use it as is (huayu chat {cfg.base} --adapter {cfg.adapter})")
    if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        raise HuayuError(f"--out '{cfg.out}' exists and is not empty: choose another directory")


def merge(cfg: MergeConfig) -> Path:
    """Write base + adapter as one plain model into cfg.out: built under a temporary name, then
    renamed, so an interrupted export never leaves a half-written model."""
    from huayu.models.loading import load_for_inference

    check(cfg)
    tokenizer, model = load_for_inference(cfg.base, cfg.adapter)
    out = Path(cfg.out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.merge_and_unload().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if (Path(cfg.adapter) / TEMPLATE_RECORD).exists():  # the merged weights learned the adapter's template
        shutil.copy(Path(cfg.adapter) / TEMPLATE_RECORD, tmp / TEMPLATE_RECORD)
    record = {"base": str(Path(cfg.base).resolve()), "adapter": str(Path(cfg.adapter).resolve()), "method": "lora"}
    (tmp / EXPORT_FILE).write_text(yaml.safe_dump(record, allow_unicode=True, sort_keys=False), encoding="utf-8")
    os.replace(tmp, out)
    return out


@dataclass
class ReshardConfig:
    model: str = field_doc("model directory (sharded or not)", positional=True, default=None)
    max_shard_size: str = field_doc("largest shard, e.g. 50MB, 2GB (transformers' units)", default="50MB")
    out: str = field_doc("output directory (must not exist, or be empty)", default=None)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_FILES or (name.startswith("model-") and name.endswith(".safetensors")) or \
        (name.startswith("pytorch_model-") and name.endswith(".bin"))


def reshard(cfg: ReshardConfig) -> tuple[Path, int]:
    """Write cfg.model's weights as shards of at most cfg.max_shard_size into cfg.out, with its
    tokenizer and every other file of the directory (chat template record, cloze.json, configs);
    (cfg.out, number of shards). Built under a temporary name, then renamed."""
    from huayu.models.loading import is_adapter_dir, load_model, load_tokenizer

    if not (cfg.model and cfg.out):
        raise HuayuError("usage: huayu export reshard MODEL --max-shard-size 50MB --out DIR")
    if is_adapter_dir(cfg.model):
        raise HuayuError(f"'{cfg.model}' is an adapter: merge it into its base first (huayu export merge)")
    if not Path(cfg.model, "config.json").exists():
        raise HuayuError(f"'{cfg.model}' is not a model directory (it has no config.json)")
    if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        raise HuayuError(f"--out '{cfg.out}' exists and is not empty: choose another directory")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, dtype="auto")
    out = Path(cfg.out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
    except ValueError as exc:
        raise HuayuError(f"--max-shard-size {cfg.max_shard_size!r}: {exc}") from None
    tokenizer.save_pretrained(tmp)
    for source in Path(cfg.model).iterdir():
        if source.is_file() and not _is_weight_file(source.name) and not (tmp / source.name).exists():
            shutil.copy(source, tmp / source.name)
    shards = len(list(tmp.glob("model*.safetensors")))
    record = {"source": str(Path(cfg.model).resolve()), "method": "reshard", "max_shard_size": cfg.max_shard_size,
              "shards": shards}
    (tmp / EXPORT_FILE).write_text(yaml.safe_dump(record, allow_unicode=True, sort_keys=False), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)  # empty, checked above
    os.replace(tmp, out)
    return out, shards


def add_reshard_arguments(parser) -> None:
    add_config_arguments(parser, ReshardConfig)


def run_reshard(args) -> None:
    cfg = config_from_args(ReshardConfig, args)
    out, shards = reshard(cfg)
    print(f"resharded '{cfg.model}' into {out}: {shards} safetensors shard(s) of at most {cfg.max_shard_size}")


def add_merge_arguments(parser) -> None:
    add_config_arguments(parser, MergeConfig)


def run_merge(args) -> None:
    cfg = config_from_args(MergeConfig, args)
    print(f"merged '{cfg.adapter}' into '{cfg.base}': {merge(cfg)}")
