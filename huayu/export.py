"""`huayu export merge`: fold a LoRA adapter into its base model; `huayu export reshard`: the same
model in safetensors shards of a chosen size; `huayu quantize`: the same model with int8 or int4
weights (huayu.quantization).

A merge is a plain Hugging Face model (safetensors + tokenizer) that loads and decodes without
peft and with no adapter overhead, and gives the same outputs as base + adapter. Prefix adapters
add virtual tokens rather than weight deltas, so they have nothing to fold in.

Resharding is the modern form of EVA's `change_mp.py`: instead of re-cutting tensors for a model
parallel degree, the weights are written as shards of at most `--max-shard-size` with transformers'
`model.safetensors.index.json`, which every loader (huayu's stages, plain transformers, accelerate's
big-model loading) reads shard by shard. The dtype is kept.

Each command writes its --out by huayu.outputs' rule: a new or empty directory, or its own earlier
output (replaced once the new one is complete); anything else only with --overwrite.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.templates import TEMPLATE_RECORD
from huayu.errors import HuayuError
from huayu.outputs import OUTPUT_RECORD, OVERWRITE_HELP, building, check_output_dir

EXPORT_FILE = "huayu_export.yaml"
OUT_HELP = "output directory: new, empty, or an earlier output of this command (replaced)"


@dataclass
class MergeConfig:
    base: str = field_doc("base model directory the adapter was trained on", positional=True, default=None)
    adapter: str = field_doc("LoRA adapter directory (e.g. the output of huayu sft --finetuning-type lora)",
                             positional=True, default=None)
    out: str = field_doc(OUT_HELP, default=None)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)


def check(cfg: MergeConfig) -> None:
    from huayu.models.loading import adapter_config

    if not (cfg.base and cfg.adapter and cfg.out):
        raise HuayuError("usage: huayu export merge BASE ADAPTER --out DIR")
    peft_type = adapter_config(cfg.adapter).get("peft_type")
    if peft_type != "LORA":
        raise HuayuError(f"'{cfg.adapter}' is a {peft_type} adapter, which cannot be merged: only LoRA adds weight "
                         f"deltas; use it as is (huayu chat {cfg.base} --adapter {cfg.adapter})")
    _check_out(cfg, "export merge", cfg.base, cfg.adapter)


def _check_out(cfg: MergeConfig | ReshardConfig | QuantizeConfig, command: str, *inputs: str) -> None:
    """The output rule (huayu.outputs) for cfg.out, which must not be one of the command's inputs
    either: with --overwrite that would mix the new model's files into the old one's."""
    if any(Path(cfg.out).resolve() == Path(path).resolve() for path in inputs):
        raise HuayuError(f"--out '{cfg.out}' is an input of `huayu {command}`: choose another directory")
    check_output_dir(cfg.out, command, cfg.overwrite)


def merge(cfg: MergeConfig) -> Path:
    """Write base + adapter as one plain model into cfg.out: built under a temporary name, then
    installed, so an interrupted export never leaves a half-written model."""
    from huayu.models.loading import load_for_inference

    check(cfg)
    tokenizer, model = load_for_inference(cfg.base, cfg.adapter)
    with building(cfg.out, "export merge") as tmp:
        model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(cfg.adapter) / TEMPLATE_RECORD).exists():  # the merged weights learned the adapter's template
            shutil.copy(Path(cfg.adapter) / TEMPLATE_RECORD, tmp / TEMPLATE_RECORD)
        record = {"base": str(Path(cfg.base).resolve()), "adapter": str(Path(cfg.adapter).resolve()),
                  "method": "lora"}
        (tmp / EXPORT_FILE).write_text(yaml.safe_dump(record, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return Path(cfg.out)


@dataclass
class ReshardConfig:
    model: str = field_doc("model directory (sharded or not)", positional=True, default=None)
    max_shard_size: str = field_doc("largest shard, e.g. 50MB, 2GB (transformers' units)", default="50MB")
    out: str = field_doc(OUT_HELP, default=None)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)


SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_FILES or (name.startswith("model-") and name.endswith(".safetensors")) or \
        (name.startswith("pytorch_model-") and name.endswith(".bin"))


def _check_model_out(cfg: ReshardConfig | QuantizeConfig, command: str, usage: str) -> None:
    from huayu.models.loading import is_adapter_dir

    if not (cfg.model and cfg.out):
        raise HuayuError(f"usage: huayu {command} {usage}")
    if is_adapter_dir(cfg.model):
        raise HuayuError(f"'{cfg.model}' is an adapter: merge it into its base first (huayu export merge)")
    if not Path(cfg.model, "config.json").exists():
        raise HuayuError(f"'{cfg.model}' is not a model directory (it has no config.json)")
    _check_out(cfg, command, cfg.model)


def _write_model_dir(source: str, out: str, command: str, tokenizer, write_weights, record: dict) -> Path:
    """`out` holding what write_weights(dir) writes, the tokenizer, every other file of `source`
    (chat template record, cloze.json, configs; not its output record) and the export record,
    completed by what write_weights returns: built under a temporary name, then installed, so an
    interrupted export never leaves a half-written model."""
    with building(out, command) as tmp:
        record = {"source": str(Path(source).resolve()), **record, **write_weights(tmp)}
        tokenizer.save_pretrained(tmp)
        for file in Path(source).iterdir():
            if file.is_file() and not _is_weight_file(file.name) and file.name != OUTPUT_RECORD \
                    and not (tmp / file.name).exists():
                shutil.copy(file, tmp / file.name)
        (tmp / EXPORT_FILE).write_text(yaml.safe_dump(record, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return Path(out)


def reshard(cfg: ReshardConfig) -> tuple[Path, int]:
    """Write cfg.model's weights as shards of at most cfg.max_shard_size into cfg.out;
    (cfg.out, number of shards)."""
    from huayu.models.loading import load_model, load_tokenizer

    _check_model_out(cfg, "export reshard", "MODEL --max-shard-size 50MB --out DIR")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, dtype="auto")
    if getattr(model.config, "huayu_quantization", None):
        raise HuayuError(f"'{cfg.model}' is quantized: reshard the full-precision model, then quantize")

    def write(tmp: Path) -> dict:
        try:
            model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        except ValueError as exc:
            raise HuayuError(f"--max-shard-size {cfg.max_shard_size!r}: {exc}") from None
        if not (tmp / SAFETENSORS_INDEX).exists():
            _index_single_file(tmp, model.num_parameters())
        return {"shards": len(list(tmp.glob("model*.safetensors")))}

    out = _write_model_dir(cfg.model, cfg.out, "export reshard", tokenizer, write,
                           {"method": "reshard", "max_shard_size": cfg.max_shard_size})
    return out, len(list(out.glob("model*.safetensors")))


def _index_single_file(directory: Path, parameters: int) -> None:
    """The index transformers writes only for several shards, written for the one model.safetensors
    too, so every reshard output has one; loaders that take model.safetensors first read the same
    weights either way."""
    with open(directory / SAFETENSORS, "rb") as f:  # safetensors: an 8-byte little-endian length, a JSON header
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    size = sum(end - start for start, end in (tensor["data_offsets"] for tensor in header.values()))
    index = {"metadata": {"total_parameters": parameters, "total_size": size},
             "weight_map": {name: SAFETENSORS for name in sorted(header)}}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass
class QuantizeConfig:
    model: str = field_doc("model directory of a generative model (decoder, T5, GLM)", positional=True, default=None)
    bits: int = field_doc("8: int8 weights, one scale per row; 4: int4 weights in groups", default=8)
    group_size: int = field_doc("int4: input columns sharing one scale and zero (32, 64, 128, 256)", default=32)
    out: str = field_doc(OUT_HELP, default=None)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)


def quantize(cfg: QuantizeConfig) -> tuple[Path, dict]:
    """cfg.model with weight-only quantized Linear layers, saved into cfg.out; (cfg.out, record)."""
    from huayu.models.loading import load_model, load_tokenizer
    from huayu.quantization import check_quantization, quantize_model, save_quantized

    _check_model_out(cfg, "quantize", "MODEL --bits 8|4 [--group-size 32] --out DIR")
    check_quantization(cfg.bits, cfg.group_size)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, dtype="auto")
    if not model.can_generate():
        raise HuayuError(f"'{cfg.model}' ({model.config.model_type}) does not generate text: huayu quantize "
                         "is for decoders, T5 and GLM models")
    record = quantize_model(model, cfg.bits, cfg.group_size)

    def write(tmp: Path) -> dict:
        save_quantized(model, tmp)
        return {"bits": cfg.bits, "group_size": record["group_size"],
                "int8_layers": sum(b == 8 for b in record["layers"].values()),
                "int4_layers": sum(b == 4 for b in record["layers"].values())}

    return _write_model_dir(cfg.model, cfg.out, "quantize", tokenizer, write, {"method": "quantize"}), record


def add_quantize_arguments(parser) -> None:
    add_config_arguments(parser, QuantizeConfig)


def run_quantize(args) -> None:
    cfg = config_from_args(QuantizeConfig, args)
    out, record = quantize(cfg)
    counts = {b: sum(v == b for v in record["layers"].values()) for b in (8, 4)}
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    print(f"quantized '{cfg.model}' into {out}: {counts[4]} int4 and {counts[8]} int8 Linear layers, "
          f"weights {size / 2**20:.1f} MiB")


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
