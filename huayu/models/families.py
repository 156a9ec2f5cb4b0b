"""Model families: the one place that knows how architectures differ.

A family says which Auto class loads it, whether it generates and which modules LoRA adapts by
default. Code elsewhere asks `family_of(config)` (or the helpers below) instead of testing
`model_type`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from huayu.data.templates import EOP, GMASK, MASK, SMASK, SOP
from huayu.errors import HuayuError
from huayu.models.presets import (DECODER_PRESETS, ENCODER_DECODER_PRESETS, ENCODER_PRESETS, GLM_PRESETS,
                                  decoder_config, encoder_config, encoder_decoder_config, glm_config)

CAUSAL, SEQ2SEQ, BLANK, ENCODE = "causal", "seq2seq", "blank", "encode"
# GLM's tokens (huayu/models/glm.py), by the config field that records each id
GLM_SPECIAL_TOKENS = {"mask_token_id": MASK, "smask_token_id": SMASK, "gmask_token_id": GMASK,
                      "sop_token_id": SOP, "eop_token_id": EOP}


@dataclass(frozen=True)
class Family:
    """What differs between model families, and nothing else: the Auto class, the presets and how
    they are configured, LoRA's default targets, peft's task type, the tokens the family needs, and
    how a dialogue becomes an example, a prompt, a batch and positions."""
    name: str
    auto_class: str                 # attribute of `transformers`
    layout: str                     # causal: context and reply in one causal sequence; seq2seq: the encoder
    #                                 reads the context, the decoder writes the reply; blank (GLM): the context
    #                                 is Part A, the reply one [gMASK] span in Part B; encode: no dialogue
    presets: dict = field(default_factory=dict)
    build_config: Callable | None = None   # (preset name, vocab size, special ids) -> config
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model_type -> module names
    peft_task: str = "CAUSAL_LM"
    default_objective: str = "causal"
    special_tokens: dict[str, str] = field(default_factory=dict)  # config field -> token the tokenizer must have

    @property
    def seq2seq(self) -> bool:
        return self.layout == SEQ2SEQ

    def auto(self):
        import transformers
        return getattr(transformers, self.auto_class)

    def encode_dialogue(self, tokenizer, messages, max_source: int, max_target: int, loss_on: str = "assistant",
                        max_length: int | None = None):
        """A training example whose target is the last assistant turn."""
        from huayu.data import chat

        if self.seq2seq:
            return chat.encode_source_target(tokenizer, messages, max_source, max_target, max_length)
        if self.layout == BLANK:
            return chat.encode_blank_dialogue(tokenizer, messages, max_source, max_target, max_length)
        return chat.encode_dialogue(tokenizer, messages, max_source, max_target, loss_on, max_length)

    def encode_prompt(self, tokenizer, context: list[dict], max_source: int) -> list[int]:
        """What the model reads before it writes the assistant's next turn."""
        from huayu.data import chat

        if self.seq2seq:
            return chat.encode_source(tokenizer, context, max_source)
        if self.layout == BLANK:
            return chat.encode_blank_prompt(tokenizer, context, max_source)
        return chat.encode_prompt(tokenizer, context, max_source)

    def continuation_prompt(self, tokenizer, ids: list[int]) -> list[int]:
        """What the model reads to continue raw text `ids`: the text itself, or for GLM the text as
        Part A with a [gMASK] at its end (unless it has a blank already) and the span's <sop>."""
        if self.layout != BLANK:
            return ids
        special = self.special_ids(tokenizer)
        blanks = {special["mask_token_id"], special["smask_token_id"], special["gmask_token_id"]}
        return ids + ([] if blanks & set(ids) else [special["gmask_token_id"]]) + [special["sop_token_id"]]

    def add_special_tokens(self, tokenizer) -> int:
        """Add the family's tokens the tokenizer lacks (at the end of its vocabulary, so existing
        ids keep their meaning); the number added."""
        from tokenizers import AddedToken

        vocab = tokenizer.get_vocab()
        missing = [t for t in self.special_tokens.values() if t not in vocab]
        return tokenizer.add_tokens([AddedToken(t, special=True) for t in missing], special_tokens=True) \
            if missing else 0

    def special_ids(self, tokenizer) -> dict[str, int]:
        """The ids of the family's tokens, by config field."""
        return {key: tokenizer.convert_tokens_to_ids(token) for key, token in self.special_tokens.items()}

    def prefill_positions(self, model, ids, mask):
        """Position ids of a left-padded batch of prompts: real tokens counted from 0, or GLM's 2D
        positions read off the ids."""
        if self.layout == BLANK:
            from huayu.models.glm import blank_layout

            return blank_layout(ids, mask, model.config)[0]
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def next_positions(self, last):
        """The positions of the token after `last` (the last column of the prompt's): one further,
        or in GLM's Part B one further inside the span (the first id stays the span's)."""
        if self.layout == BLANK:
            return last + last.new_tensor([0, 1]).view(1, 2, 1)
        return last + 1

    def loss_items(self, batch: dict) -> int:
        """How many items a batch's loss is the mean over: its examples when each has one label
        (classification, cloze), else its target tokens, which a causal model predicts one
        position on (it drops the first label); encoder-decoders, masked LMs and GLM align theirs."""
        from huayu.data.batching import IGNORE

        labels = batch["labels"]
        if labels.dim() == 1:
            return len(labels)
        return int(((labels[:, 1:] if self.layout == CAUSAL else labels) != IGNORE).sum())

    def collate(self, pad_id: int):
        from huayu.data.batching import pad_collate, seq2seq_collate

        return (seq2seq_collate if self.seq2seq else pad_collate)(pad_id)

    def new_tokens(self, generated, prompt_width: int):
        """The generated ids without the prompt: a decoder's output begins with the prompt, an
        encoder-decoder's with its decoder start token (a special token, dropped when decoding)."""
        return generated if self.seq2seq else generated[:, prompt_width:]


# The attention projections, as in the LoRA paper (which adapts attention weights only): a small
# adapter of 4·2·r·hidden weights per layer. `--lora-target all-linear` adapts the MLP too, as
# QLoRA found worthwhile; the choice is the user's, the default stays cheap.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DECODER_LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "glm", "glm4"),
                    ATTENTION_PROJECTIONS),
    "gpt2": ("c_attn",),  # GPT-2's fused q/k/v projection, a Conv1D
    "bloom": ("query_key_value",),  # BLOOM's fused q/k/v projection, and ChatGLM's (its own code)
    "chatglm": ("query_key_value",),
}
SEQ2SEQ_LORA_TARGETS = {"t5": ("q", "v"), "mt5": ("q", "v"),  # the LoRA paper's choice, T5's names
                        "bart": ("q_proj", "v_proj"), "mbart": ("q_proj", "v_proj")}
ALL_LINEAR = "all-linear"

DECODER = Family("decoder", "AutoModelForCausalLM", CAUSAL, DECODER_PRESETS, decoder_config, DECODER_LORA_TARGETS)
ENCODER_DECODER = Family("encoder-decoder", "AutoModelForSeq2SeqLM", SEQ2SEQ, ENCODER_DECODER_PRESETS,
                         encoder_decoder_config, SEQ2SEQ_LORA_TARGETS, peft_task="SEQ_2_SEQ_LM",
                         default_objective="span")
ENCODER = Family("encoder", "AutoModelForPreTraining", ENCODE, ENCODER_PRESETS, encoder_config,
                 {t: ("query", "value") for t in ("bert", "ernie", "roberta", "nezha", "megatron-bert")},
                 peft_task="SEQ_CLS", default_objective="mlm")
GLM = Family("glm", "AutoModelForCausalLM", BLANK, GLM_PRESETS, glm_config, {"huayu-glm": ATTENTION_PROJECTIONS},
             default_objective="blank", special_tokens=GLM_SPECIAL_TOKENS)
FAMILIES = {f.name: f for f in (DECODER, ENCODER_DECODER, ENCODER, GLM)}
# BERT-like model types: bidirectional encoders without a decoder
ENCODER_TYPES = {"bert", "ernie", "roberta", "xlm-roberta", "electra", "albert", "megatron-bert", "nezha",
                 "deberta", "deberta-v2", "distilbert"}


def family_of(config) -> Family:
    """The family of a loaded transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    if config.model_type == "huayu-glm":
        return GLM
    if config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        return ENCODER
    return DECODER


def family_of_preset(name: str) -> Family | None:
    for fam in FAMILIES.values():
        if name in fam.presets:
            return fam
    return None


@functools.lru_cache(maxsize=64)
def family_of_model(spec: str) -> Family:
    """The family of MODEL as given on a command line: a preset name or a model directory."""
    from pathlib import Path

    if Path(spec, "config.json").exists():
        from huayu.models.loading import load_config

        return family_of(load_config(spec))
    family = family_of_preset(spec)
    if family is None:
        raise HuayuError(f"'{spec}' is neither a model directory (with config.json) nor a preset "
                         f"({', '.join(all_presets())})")
    return family


def all_presets() -> list[str]:
    return [name for fam in FAMILIES.values() for name in fam.presets]


# The config keys that give a stack's layer count: transformers' name (which GPT-2 maps to `n_layer`),
# ChatGLM's and T5's `num_layers`, an encoder-decoder's decoder stack.
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "decoder_layers")


def layer_count(config) -> int | None:
    """The number of transformer blocks (an encoder-decoder's encoder's) a config says it has."""
    return next((n for k in LAYER_COUNT_KEYS if (n := getattr(config, k, None))), None)


def layer_stacks(model) -> list[tuple[str, "torch.nn.ModuleList"]]:
    """(name, blocks) of every stack of transformer blocks: a decoder's one, an encoder-decoder's
    encoder and decoder stacks.

    Found by shape, not by attribute name (`model.layers`, `transformer.h`, `decoder.block`, ...):
    the ModuleLists as long as one of the config's layer counts (LAYER_COUNT_KEYS)."""
    import torch

    sizes = {getattr(model.config, k, None) for k in LAYER_COUNT_KEYS} - {None, 0}
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) in sizes]
    if not stacks:
        raise HuayuError(f"cannot find the transformer layers of {type(model).__name__}")
    return stacks


def transformer_layers(model) -> tuple[str, "torch.nn.ModuleList"]:
    """The stack nearest the output: a decoder's layers, an encoder-decoder's decoder layers (what
    `--finetuning-type freeze` trains the last of)."""
    return layer_stacks(model)[-1]


def linear_types() -> tuple[type, ...]:
    """The layer types LoRA adapts: nn.Linear and GPT-2's transposed Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def has_transposed_linears(model) -> bool:
    """Whether the blocks use GPT-2's Conv1D, whose weight is stored (in, out): LoRA must be
    told (peft's `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for _, layers in layer_stacks(model) for m in layers.modules())


def all_linear_targets(model) -> str:
    """A peft target regex for every linear layer inside the transformer blocks, so that the
    embeddings and lm_head are never adapted (whatever they are called)."""
    import re

    stacks = layer_stacks(model)
    inner = sorted({name.split(".", 1)[1] for _, layers in stacks for name, m in layers.named_modules()
                    if isinstance(m, linear_types()) and "." in name})
    if not inner:
        raise HuayuError(f"no linear layers found inside the transformer layers of {type(model).__name__}")
    prefixes = "|".join(re.escape(prefix) for prefix, _ in stacks)
    return rf"({prefixes})\.\d+\.({'|'.join(map(re.escape, inner))})"


def lora_targets(model, requested: list[str]) -> list[str] | str:
    """The modules LoRA adapts: `requested` names, else the family default for the model type,
    else (unknown architectures, or `all-linear`) every linear layer in the transformer blocks."""
    if requested == [ALL_LINEAR]:
        return all_linear_targets(model)
    if requested:
        return requested
    default = family_of(model.config).lora_targets.get(model.config.model_type)
    return list(default) if default else all_linear_targets(model)


def cache_argument(model) -> str | None:
    """The name under which the model's forward takes its key/value cache: `cache` since
    transformers 5.24, `past_key_values` before; None for a model that takes none."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)
