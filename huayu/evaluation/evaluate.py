"""`huayu eval`: static evaluation of a dialogue test set, and the loss on a general text set.

Each dialogue's last assistant turn is the reference; the turns before it are the context. The
loss is the model's loss on the reference given the context (as in EVA); generations are decoded in
batches and scored under both conventions of huayu.evaluation.metrics: EVA's at the top level of
metrics.json (where they have always been) and ChatGLM's ADGEN ones under "adgen".

`--general-data` adds the loss on plain text packed as in pre-training. Run it on the base model
and on the fine-tuned one: the rise of `general_loss` is what fine-tuning made the model forget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from huayu.config import add_config_arguments, config_from_args, field_doc, save_config
from huayu.data.chat_templates import TEMPLATE_HELP
from huayu.data.sources import DialogueDataArgs
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs
from huayu.models.families import CAUSAL
from huayu.models.loading import InferenceArgs
from huayu.outputs import OVERWRITE_HELP, check_output_dir, claim_output_dir

USAGE = "usage: huayu eval MODEL --data PATH [--general-data PATH ...] --out DIR  (or MODEL --general-data PATH)"


@dataclass
class EvalConfig:
    model: str = field_doc("model directory", positional=True, default=None)
    adapter: str | None = field_doc("adapter directory to load on top of the model", default=None)
    data: list[str] = field_doc("test data files or directories", default_factory=list)
    general_data: list[str] = field_doc("plain-text corpora whose loss shows forgetting", default_factory=list)
    general_seq_len: int = field_doc("tokens per packed block of --general-data", default=256)
    out: str = field_doc("directory for metrics.json and the prediction files", default="out/eval")
    split: str = field_doc("which file of an EVA directory to read", default="test")
    dialogue: DialogueDataArgs = field_doc("how dialogues are read and cut", default_factory=DialogueDataArgs)
    template: str | None = field_doc(TEMPLATE_HELP, default=None)
    placement: InferenceArgs = field_doc("where the model runs", default_factory=InferenceArgs)
    system: str | None = field_doc("system message given to every dialogue that has none", default=None)
    decoding: DecodingArgs = field(default_factory=DecodingArgs, metadata={"help": "decoding"})
    batch_size: int = field_doc("dialogues (or text blocks) per generation/loss batch", default=8)
    max_samples: int = field_doc("evaluate only the first N dialogues (0: all)", default=0)
    eva_compat: bool = field_doc("reproduce EVA's metric code where it differs", default=False)
    skip_invalid: bool = field_doc("skip malformed records (reported) instead of stopping", default=False)
    seed: int = field_doc("random seed (for sampling)", default=1234)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.model` and write metrics.json (plus the prediction files when there is --data).

    Both data sets are read before the model is loaded, so a bad file fails in a second.
    """
    import torch

    if not cfg.model or not (cfg.data or cfg.general_data):
        raise HuayuError(USAGE)
    check_output_dir(cfg.out, "eval", cfg.overwrite)  # before the work, not after it
    torch.manual_seed(cfg.seed)
    dialogues = _read_dialogues(cfg) if cfg.data else []
    general = _read_general(cfg) if cfg.general_data else []
    gen = _load_generator(cfg)
    metrics, rows = _evaluate_dialogues(cfg, gen, dialogues) if dialogues else ({}, [])
    if general:
        metrics |= _general_loss(cfg, gen, general)
    if dialogues:
        metrics["conventions"] = _conventions(cfg.eva_compat)
    _write(Path(cfg.out), cfg, metrics, rows)
    return metrics


def _read_dialogues(cfg: EvalConfig) -> list:
    """The test dialogues, each given --system unless it has a system message."""
    from huayu.data.chat_templates import with_system
    from huayu.data.sources import read_dialogue_files

    dialogues = read_dialogue_files(cfg.data, cfg.dialogue, cfg.skip_invalid, cfg.split)
    dialogues = dialogues[:cfg.max_samples] if cfg.max_samples else dialogues
    if not dialogues:
        raise HuayuError(f"no dialogues in {', '.join(cfg.data)}")
    return [replace(d, messages=with_system(d.messages, cfg.system)) for d in dialogues]


def _read_general(cfg: EvalConfig) -> list:
    from huayu.data.sources import read_text_files

    records = read_text_files(cfg.general_data, None, "tgt_txt", cfg.skip_invalid)
    if not records:
        raise HuayuError(f"no text in {', '.join(cfg.general_data)}")
    return records


def _load_generator(cfg: EvalConfig):
    """Pass `adapter` and `template` only when given, so a plain model loads with any Generator.load."""
    from huayu.generation import Generator

    options = {"adapter": cfg.adapter, "template": cfg.template}
    return Generator.load(cfg.model, placement=cfg.placement, **{k: v for k, v in options.items() if v})


def _evaluate_dialogues(cfg: EvalConfig, gen, dialogues: list) -> tuple[dict, list[dict]]:
    """Reference loss, generations and both conventions' scores; one prediction row per dialogue."""
    from huayu.evaluation.metrics import adgen_metrics, dialogue_metrics
    from huayu.train.loop import evaluate_loss

    d = cfg.dialogue
    examples = [gen.family.encode_dialogue(gen.tokenizer, x.messages, d.max_source_length, d.max_target_length,
                                           "last") for x in dialogues]
    loss = evaluate_loss(gen.model, examples, gen.family.collate(gen.tokenizer.pad_token_id), cfg.batch_size)
    pairs = [_context_and_reference(x) for x in dialogues]
    hyps = _generate(cfg, gen, [context for context, _ in pairs])
    refs = [ref for _, ref in pairs]
    metrics = {"loss": round(loss, 4), "ppl": _ppl(loss), **dialogue_metrics(hyps, refs, eva_compat=cfg.eva_compat),
               "samples": len(dialogues), "adgen": adgen_metrics(hyps, refs)}
    rows = [{"context": [m["content"] for m in context], "reference": ref, "generation": hyp}
            for (context, ref), hyp in zip(pairs, hyps)]
    return metrics, rows


def _context_and_reference(dialogue) -> tuple[list[dict], str]:
    messages = dialogue.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _generate(cfg: EvalConfig, gen, contexts: list[list[dict]]) -> list[str]:
    from tqdm.auto import tqdm

    hyps = []
    for start in tqdm(range(0, len(contexts), cfg.batch_size), desc="generate", unit="batch"):
        prompts = [gen.encode_chat(c, cfg.dialogue.max_source_length) for c in contexts[start:start + cfg.batch_size]]
        hyps += [h.strip() for h in gen.generate_ids(prompts, cfg.decoding)]
    return hyps


def _general_loss(cfg: EvalConfig, gen, records: list) -> dict:
    """Token-weighted loss on the general text, packed into blocks exactly as pre-training packs it."""
    from huayu.data.batching import pad_collate
    from huayu.data.packing import pack, tokenize_records
    from huayu.train.loop import evaluate_loss

    if gen.family.layout != CAUSAL:
        raise HuayuError("--general-data measures a causal LM's loss on plain text; it needs a decoder-only model, "
                         f"not a {gen.family.name} model")
    if not 2 <= cfg.general_seq_len <= gen.max_positions:
        raise HuayuError(f"--general-seq-len must be between 2 and the model's context of "
                         f"{gen.max_positions} tokens, got {cfg.general_seq_len}")
    # A 1-token tail block predicts nothing; alone in a batch its loss would be NaN.
    blocks = [b for b in pack(tokenize_records(gen.tokenizer, records), cfg.general_seq_len)
              if len(b.input_ids) > 1]
    loss = evaluate_loss(gen.model, blocks, pad_collate(gen.tokenizer.pad_token_id), cfg.batch_size)
    return {"general_loss": round(loss, 4), "general_ppl": _ppl(loss)}


def _conventions(eva_compat: bool) -> dict[str, str]:
    from huayu.evaluation.metrics import CONVENTIONS

    compat = " (--eva-compat: EVA's code exactly, whitespace kept)" if eva_compat else ""
    return {"eva": CONVENTIONS["eva"] + compat, "adgen": CONVENTIONS["adgen"]}


def _ppl(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 4)


def _write(out: Path, cfg: EvalConfig, metrics: dict, rows: list[dict]) -> None:
    """metrics.json, and with dialogues predictions.jsonl plus ChatGLM's generated_predictions.jsonl."""
    claim_output_dir(out, "eval", cfg.overwrite)
    save_config(cfg, out / "config.yaml")
    files = {"metrics.json": json.dumps(metrics, ensure_ascii=False, indent=2) + "\n"}
    if rows:
        files["predictions.jsonl"] = _jsonl(rows)
        files["generated_predictions.jsonl"] = _jsonl({"labels": r["reference"], "predict": r["generation"]}
                                                      for r in rows)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def add_arguments(parser) -> None:
    add_config_arguments(parser, EvalConfig)


def run(args) -> None:
    metrics = evaluate(config_from_args(EvalConfig, args))
    print(json.dumps(metrics, ensure_ascii=False, indent=2))
