"""`huayu pretrain`: causal-LM pre-training on packed text.

Records with only a text field are continuation training; records that also carry a target
(`tgt_txt`, as in the GPT-3 seed) are input->output training with loss on the target only. The
packed blocks are cached on disk (huayu/data/cache.py), so a corpus is tokenized once.
"""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.cache import DataCacheConfig, add_no_cache_flag
from huayu.train.stage import StageConfig, run_stage


@dataclass
class PretrainConfig(DataCacheConfig, StageConfig):
    out: str = field_doc("output directory", default="out/pretrain")
    text_field: str | None = field_doc("JSON field with the text (default: text, src_txt or content)",
                                       default=None)
    target_field: str = field_doc("JSON field that makes a record input->output", default="tgt_txt")
    seq_len: int = field_doc("tokens per packed block", default=256)


def block_dataset(tokenizer, paths: list[str], seq_len: int, skip_invalid: bool, cache: DataCacheConfig,
                  text_field: str | None = None, target_field: str = "tgt_txt"):
    """The text records of `paths` tokenized, joined with EOS and cut into `seq_len`-token blocks,
    as an Arrow dataset (shared with `huayu sft --replay-data`)."""
    from tqdm.auto import tqdm

    from huayu.data.cache import cached_dataset
    from huayu.data.packing import pack, tokenize_records
    from huayu.data.sources import read_text_files

    def build(notes: list[str]):
        records = read_text_files(paths, text_field, target_field, skip_invalid, report=notes.append)
        with_target = sum(r.target is not None for r in records)
        pairs = tqdm(tokenize_records(tokenizer, records), total=len(records), desc="tokenize", unit="doc",
                     leave=False)
        blocks = pack(pairs, seq_len)
        notes.append(f"{', '.join(paths)}: {len(records):,} records ({with_target:,} input->output) -> "
                     f"{len(blocks):,} blocks of {seq_len} tokens")
        return blocks

    options = {"text_field": text_field, "target_field": target_field, "skip_invalid": skip_invalid,
               "seq_len": seq_len}
    return cached_dataset("blocks", paths, tokenizer, options, build, cache)


def build_examples(cfg: PretrainConfig, tokenizer):
    from huayu.data.cache import ArrowExamples

    def blocks(paths):
        return ArrowExamples(block_dataset(tokenizer, paths, cfg.seq_len, cfg.skip_invalid, cfg, cfg.text_field,
                                           cfg.target_field))

    return blocks(cfg.data), (blocks(cfg.valid_data) if cfg.valid_data else None)


def add_arguments(parser) -> None:
    add_config_arguments(parser, PretrainConfig)
    add_no_cache_flag(parser)


def run(args) -> None:
    cfg = config_from_args(PretrainConfig, args)
    run_stage(cfg, lambda tok: build_examples(cfg, tok))
