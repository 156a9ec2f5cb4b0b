"""`huayu eval`: EVA-style static evaluation of a dialogue test set.

Each dialogue's last assistant turn is the reference; the turns before it are the context. The
loss is the model's loss on the reference given the context (as in EVA); generations are decoded in
batches and scored with the character-level metrics of huayu.evaluation.metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from huayu.config import add_config_arguments, config_from_args, field_doc, save_config
from huayu.data.sources import DialogueDataArgs
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs


@dataclass
class EvalConfig:
    model: str = field_doc("model directory", positional=True, default=None)
    data: list[str] = field_doc("test data files or directories", default_factory=list)
    out: str = field_doc("directory for metrics.json and predictions.jsonl", default="out/eval")
    split: str = field_doc("which file of an EVA directory to read", default="test")
    dialogue: DialogueDataArgs = field_doc("how dialogues are read and cut", default_factory=DialogueDataArgs)
    decoding: DecodingArgs = field(default_factory=DecodingArgs, metadata={"help": "decoding"})
    batch_size: int = field_doc("dialogues per generation/loss batch", default=8)
    max_samples: int = field_doc("evaluate only the first N dialogues (0: all)", default=0)
    eva_compat: bool = field_doc("reproduce EVA's metric code where it differs", default=False)
    skip_invalid: bool = field_doc("skip malformed records (reported) instead of stopping", default=False)
    seed: int = field_doc("random seed (for sampling)", default=1234)


def _context_and_reference(dialogue) -> tuple[list[dict], str]:
    messages = dialogue.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def evaluate(cfg: EvalConfig) -> dict:
    import torch
    from tqdm.auto import tqdm

    from huayu.data.batching import pad_collate
    from huayu.data.chat import encode_dialogue
    from huayu.data.sources import read_dialogue_files
    from huayu.evaluation.metrics import dialogue_metrics
    from huayu.generation import Generator
    from huayu.train.loop import evaluate_loss

    if not cfg.model or not cfg.data:
        raise HuayuError("usage: huayu eval MODEL --data PATH --out DIR")
    torch.manual_seed(cfg.seed)
    dialogues = read_dialogue_files(cfg.data, cfg.dialogue, cfg.skip_invalid, cfg.split)
    dialogues = dialogues[:cfg.max_samples] if cfg.max_samples else dialogues
    if not dialogues:
        raise HuayuError(f"no dialogues in {', '.join(cfg.data)}")
    gen = Generator.load(cfg.model)
    d = cfg.dialogue
    examples = [encode_dialogue(gen.tokenizer, x.messages, d.max_source_length, d.max_target_length, "last")
                for x in dialogues]
    loss = evaluate_loss(gen.model, examples, pad_collate(gen.tokenizer.pad_token_id), cfg.batch_size)
    pairs = [_context_and_reference(x) for x in dialogues]
    hyps = []
    for start in tqdm(range(0, len(pairs), cfg.batch_size), desc="generate", unit="batch"):
        batch = pairs[start:start + cfg.batch_size]
        prompts = [gen.encode_chat(context, d.max_source_length) for context, _ in batch]
        hyps += [h.strip() for h in gen.generate_ids(prompts, cfg.decoding)]
    refs = [ref for _, ref in pairs]
    metrics = {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50)), 4),
               **dialogue_metrics(hyps, refs, eva_compat=cfg.eva_compat), "samples": len(dialogues)}
    _write(Path(cfg.out), cfg, metrics, pairs, hyps)
    return metrics


def _write(out: Path, cfg: EvalConfig, metrics: dict, pairs, hyps) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    rows = [{"context": [m["content"] for m in ctx], "reference": ref, "generation": hyp}
            for (ctx, ref), hyp in zip(pairs, hyps)]
    for name, text in (("predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
                       ("metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def add_arguments(parser) -> None:
    add_config_arguments(parser, EvalConfig)


def run(args) -> None:
    metrics = evaluate(config_from_args(EvalConfig, args))
    print(json.dumps(metrics, ensure_ascii=False, indent=2))
