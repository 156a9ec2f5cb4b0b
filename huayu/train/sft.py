"""`huayu sft`: supervised fine-tuning on multi-turn dialogues or instructions.

Loss is on assistant turns by default (`all`: every token; `last`: the final reply only); the
context is truncated from the oldest turn to `max_source_length`, the reply to `max_target_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.chat import LOSS_ON
from huayu.data.sources import DialogueDataArgs, read_dialogue_files
from huayu.errors import HuayuError
from huayu.train.stage import StageConfig, run_stage


@dataclass
class SftConfig(StageConfig):
    out: str = field_doc("output directory", default="out/sft")
    dialogue: DialogueDataArgs = field_doc("how dialogues are read and cut", default_factory=DialogueDataArgs)
    loss_on: str = field_doc(f"which tokens carry loss: {', '.join(LOSS_ON)}", default="assistant")


def build_examples(cfg: SftConfig, tokenizer):
    from tqdm.auto import tqdm

    from huayu.data.chat import encode_dialogue, ensure_chat_template

    ensure_chat_template(tokenizer)

    def encode(paths, split):
        dialogues = read_dialogue_files(paths, cfg.dialogue, cfg.skip_invalid, split)
        trailing = sum(x.messages[-1]["role"] != "assistant" for x in dialogues)
        if trailing:
            print(f"{trailing} {split} dialogues end with turns after the last assistant reply; those "
                  "turns have no reply to learn and are not used")
        d = cfg.dialogue
        return [encode_dialogue(tokenizer, x.messages, d.max_source_length, d.max_target_length, cfg.loss_on)
                for x in tqdm(dialogues, desc=f"encode {split}", unit="dlg", leave=False)]

    return encode(cfg.data, "train"), (encode(cfg.valid_data, "valid") if cfg.valid_data else None)


def add_arguments(parser) -> None:
    add_config_arguments(parser, SftConfig)


def run(args) -> None:
    cfg = config_from_args(SftConfig, args)
    if cfg.loss_on not in LOSS_ON:
        raise HuayuError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got '{cfg.loss_on}'")
    run_stage(cfg, lambda tok: build_examples(cfg, tok))
