"""`huayu generate`: continue raw text prompts (no chat template), e.g. to probe a pre-trained model."""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs
from huayu.models.loading import InferenceArgs


@dataclass
class GenerateConfig:
    model: str = field_doc("model directory", positional=True, default=None)
    adapter: str | None = field_doc("peft adapter directory applied to MODEL", default=None)
    prompt: str | None = field_doc("prompt text", default=None)
    file: str | None = field_doc("file with one prompt per line", default=None)
    fill: bool = field_doc("GLM: fill each [MASK] in the prompts instead of continuing them", default=False)
    decoding: DecodingArgs = field_doc("decoding", default_factory=DecodingArgs)
    batch_size: int = field_doc("prompts per batch", default=8)
    seed: int = field_doc("random seed (for sampling)", default=1234)
    placement: InferenceArgs = field_doc("where the model runs", default_factory=InferenceArgs)


def add_arguments(parser) -> None:
    add_config_arguments(parser, GenerateConfig)


def run(args) -> None:
    import torch

    from huayu.generation import Generator

    cfg = config_from_args(GenerateConfig, args)
    prompts = [cfg.prompt] if cfg.prompt else []
    if cfg.file:
        with open(cfg.file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not cfg.model or not prompts:
        raise HuayuError("usage: huayu generate MODEL --prompt TEXT (or --file PROMPTS.txt)")
    torch.manual_seed(cfg.seed)
    gen = Generator.load(cfg.model, adapter=cfg.adapter, placement=cfg.placement)
    if cfg.fill:
        for prompt in prompts:
            print(gen.fill(prompt, cfg.decoding))
        return
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        for piece in gen.stream_ids(gen.encode_text(prompts[0]), cfg.decoding):
            print(piece, end="", flush=True)
        print()
        return
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        for prompt, text in zip(batch, gen.generate_ids([gen.encode_text(p) for p in batch], cfg.decoding)):
            print(prompt + text.replace("\n", " "))
