"""Named model sizes. A preset is a transformers config built for a given tokenizer's vocabulary.

The `tiny`/`small`/`base` presets are Llama-style decoders (RoPE, RMSNorm, SwiGLU) sized for CPU
work; the `gpt3-*` presets reproduce the Chinese GPT-3 seed's size table as GPT-2-architecture
configs (GPT-3 is GPT-2's block with more layers), with the seed's learning rate as a hint.
The encoder-decoder presets are T5 v1.1 / mT5-style configs (gated-GELU MLP, relative position
buckets): `t5-*` for CPU work, `eva*` with the layer counts, widths and heads of the EVA papers
(their MLP widths follow T5 v1.1's ratio where we could not confirm the papers' values).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    arch: str          # "llama" or "gpt2"
    layers: int
    heads: int
    hidden: int
    intermediate: int  # MLP width (llama); gpt2 uses 4 * hidden
    max_positions: int
    lr: float          # suggested peak learning rate
    note: str


DECODER_PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", 4, 4, 128, 352, 1024, 1e-3, "~1-3M parameters: tests and laptop demos"),
    "small": Preset("llama", 10, 4, 256, 704, 1024, 6e-4, "~10M parameters: CPU pre-training"),
    "base": Preset("llama", 12, 12, 768, 2048, 2048, 3e-4, "~100M parameters"),
    "gpt3-base": Preset("gpt2", 12, 12, 768, 3072, 2048, 6.0e-4, "Chinese GPT-3 base (seed table)"),
    "gpt3-large": Preset("gpt2", 24, 16, 1024, 4096, 2048, 3.0e-4, "Chinese GPT-3 large"),
    "gpt3-1.3b": Preset("gpt2", 24, 32, 2048, 8192, 2048, 2.0e-4, "Chinese GPT-3 1.3B"),
    "gpt3-2.7b": Preset("gpt2", 32, 32, 2560, 10240, 2048, 1.6e-4, "Chinese GPT-3 2.7B"),
    "gpt3-13b": Preset("gpt2", 40, 40, 5120, 20480, 2048, 1.0e-4, "Chinese GPT-3 13B"),
}


def decoder_config(name: str, vocab_size: int, special_ids: dict[str, int | None]):
    """The transformers config of preset `name` for a vocabulary of `vocab_size` tokens."""
    from transformers import GPT2Config, LlamaConfig

    p = DECODER_PRESETS[name]
    if p.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
            num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
            max_position_embeddings=p.max_positions, tie_word_embeddings=True, **special_ids)
    return GPT2Config(
        vocab_size=vocab_size, n_embd=p.hidden, n_layer=p.layers, n_head=p.heads,
        n_positions=p.max_positions, n_inner=p.intermediate, tie_word_embeddings=True, **special_ids)


@dataclass(frozen=True)
class Seq2SeqPreset:
    layers: int        # encoder layers = decoder layers
    heads: int
    d_model: int
    d_ff: int
    lr: float
    note: str


ENCODER_DECODER_PRESETS: dict[str, Seq2SeqPreset] = {
    "t5-tiny": Seq2SeqPreset(2, 4, 128, 256, 1e-3, "~1M parameters: tests"),
    "t5-small": Seq2SeqPreset(4, 4, 256, 768, 6e-4, "~9M parameters with a 6k vocabulary: CPU training"),
    "eva-cpu": Seq2SeqPreset(6, 4, 256, 640, 6e-4, "EVA's shape (deep, d_ff = 2.5 d_model) scaled to ~9M for CPU"),
    "eva2.0-base": Seq2SeqPreset(12, 12, 768, 2048, 1e-4, "EVA2.0-Base (~300M in the paper)"),
    "eva2.0-large": Seq2SeqPreset(24, 16, 1024, 2816, 1e-4, "EVA2.0-Large (~970M in the paper)"),
    "eva1.0": Seq2SeqPreset(24, 32, 2048, 5120, 1e-4, "EVA1.0 / EVA2.0-xLarge (2.8B)"),
}


def encoder_decoder_config(name: str, vocab_size: int, special_ids: dict[str, int | None]):
    """The T5 config of preset `name`; the decoder starts from the pad token, as T5's does."""
    from transformers import T5Config

    p = ENCODER_DECODER_PRESETS[name]
    return T5Config(vocab_size=vocab_size, d_model=p.d_model, d_ff=p.d_ff, d_kv=p.d_model // p.heads,
                    num_layers=p.layers, num_decoder_layers=p.layers, num_heads=p.heads,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=True,
                    decoder_start_token_id=special_ids["pad_token_id"], **special_ids)


@dataclass(frozen=True)
class EncoderPreset:
    arch: str          # "bert" or "ernie" (ERNIE 1.0/3.0 are BERT's encoder; transformers' Ernie adds task ids)
    layers: int
    heads: int
    hidden: int
    intermediate: int
    lr: float
    note: str


# ERNIE 3.0's distilled sizes (nano to base) and ERNIE 1.0-base; bert-tiny is Google's BERT-Tiny shape.
ENCODER_PRESETS: dict[str, EncoderPreset] = {
    "bert-tiny": EncoderPreset("bert", 2, 2, 128, 512, 1e-3, "BERT-Tiny's shape: tests"),
    "ernie-3.0-nano": EncoderPreset("ernie", 4, 12, 312, 1248, 5e-4, "ERNIE 3.0 Nano (4L312H), ~5M with a 7k vocab"),
    "ernie-3.0-micro": EncoderPreset("ernie", 4, 12, 384, 1536, 5e-4, "ERNIE 3.0 Micro (4L384H)"),
    "ernie-3.0-mini": EncoderPreset("ernie", 6, 12, 384, 1536, 5e-4, "ERNIE 3.0 Mini (6L384H)"),
    "ernie-3.0-medium": EncoderPreset("ernie", 6, 12, 768, 3072, 1e-4, "ERNIE 3.0 Medium (6L768H)"),
    "ernie-1.0-base": EncoderPreset("ernie", 12, 12, 768, 3072, 1e-4, "ERNIE 1.0 base (12L768H, the seed's model)"),
}


def encoder_config(name: str, vocab_size: int, special_ids: dict[str, int | None]):
    """The BERT or ERNIE config of preset `name`: 512 positions, two segment types (A and B)."""
    from transformers import BertConfig, ErnieConfig

    p = ENCODER_PRESETS[name]
    config = BertConfig if p.arch == "bert" else ErnieConfig
    return config(vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
                  num_attention_heads=p.heads, intermediate_size=p.intermediate, max_position_embeddings=512,
                  type_vocab_size=2, pad_token_id=special_ids["pad_token_id"])


@dataclass(frozen=True)
class GLMPreset:
    layers: int
    heads: int
    hidden: int
    max_positions: int
    lr: float
    note: str


# GLM's MLP is 4 x hidden. glm-nano has ERNIE 3.0 Nano's shape, for side-by-side comparisons.
GLM_PRESETS: dict[str, GLMPreset] = {
    "glm-tiny": GLMPreset(2, 4, 128, 512, 1e-3, "tests"),
    "glm-nano": GLMPreset(4, 12, 312, 512, 5e-4, "ERNIE 3.0 Nano's shape (4L312H): ~6M with a 7k vocab"),
    "glm-small": GLMPreset(10, 4, 256, 1024, 6e-4, "~10M parameters: CPU pre-training"),
    "glm-base": GLMPreset(12, 12, 768, 1024, 1e-4, "GLM-Base (110M in the paper)"),
    "glm-large": GLMPreset(24, 16, 1024, 1024, 5e-5, "GLM-Large (335M in the paper)"),
}


def glm_config(name: str, vocab_size: int, special_ids: dict[str, int | None]):
    """The huayu GLM config of preset `name`; generation ends a span at <eop>."""
    from huayu.models.glm import GLMConfig

    p = GLM_PRESETS[name]
    ids = {**special_ids, "eos_token_id": special_ids["eop_token_id"]}
    return GLMConfig(vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
                     num_attention_heads=p.heads, max_position_embeddings=p.max_positions, **ids)
