"""`huayu export merge`: fold a LoRA adapter into its base model.

The result is a plain Hugging Face model (safetensors + tokenizer) that loads and decodes without
peft and with no adapter overhead, and gives the same outputs as base + adapter. Prefix adapters
add virtual tokens rather than weight deltas, so they have nothing to fold in.
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


def add_merge_arguments(parser) -> None:
    add_config_arguments(parser, MergeConfig)


def run_merge(args) -> None:
    cfg = config_from_args(MergeConfig, args)
    print(f"merged '{cfg.adapter}' into '{cfg.base}': {merge(cfg)}")
