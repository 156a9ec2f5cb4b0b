"""`huayu pretrain`: causal-LM pre-training on packed text.

Records with only a text field are continuation training; records that also carry a target
(`tgt_txt`, as in the GPT-3 seed) are input->output training with loss on the target only.
"""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.train.stage import StageConfig, run_stage


@dataclass
class PretrainConfig(StageConfig):
    out: str = field_doc("output directory", default="out/pretrain")
    text_field: str | None = field_doc("JSON field with the text (default: text, src_txt or content)",
                                       default=None)
    target_field: str = field_doc("JSON field that makes a record input->output", default="tgt_txt")
    seq_len: int = field_doc("tokens per packed block", default=256)


def build_examples(cfg: PretrainConfig, tokenizer):
    from tqdm.auto import tqdm

    from huayu.data.packing import pack, tokenize_records
    from huayu.data.sources import read_text_files

    def blocks(paths):
        records = read_text_files(paths, cfg.text_field, cfg.target_field, cfg.skip_invalid)
        with_target = sum(r.target is not None for r in records)
        pairs = tqdm(tokenize_records(tokenizer, records), total=len(records), desc="tokenize", unit="doc",
                     leave=False)
        examples = pack(pairs, cfg.seq_len)
        print(f"{', '.join(paths)}: {len(records):,} records ({with_target:,} input->output) -> "
              f"{len(examples):,} blocks of {cfg.seq_len} tokens")
        return examples

    return blocks(cfg.data), (blocks(cfg.valid_data) if cfg.valid_data else None)


def add_arguments(parser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run(args) -> None:
    cfg = config_from_args(PretrainConfig, args)
    run_stage(cfg, lambda tok: build_examples(cfg, tok))
