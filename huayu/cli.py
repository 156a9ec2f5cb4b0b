"""The `huayu` command: a table from command to module; modules are imported only when used.

Each command module defines `add_arguments(parser)` and `run(args)`; `run` returns an exit code
(or None for success).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from huayu.errors import HuayuError
from huayu.models.loading import ALLOW_PICKLE_ENV, ALLOW_PICKLE_FLAG, TRUST_REMOTE_CODE_ENV, TRUST_REMOTE_CODE_FLAG

# command words -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data inspect": ("huayu.data.commands:inspect", "Validate a data file and show counts and samples"),
    "data convert": ("huayu.data.commands:convert", "Convert between data formats (e.g. KdConv JSON -> EVA text)"),
    "data knowledge": ("huayu.data.knowledge:knowledge", "Knowledge (triples or term descriptions) -> QA dialogues via templates"),
    "data index": ("huayu.data.token_store:index", "Segment and tokenize a corpus into a memory-mapped token store (ERNIE's _ids/_idx)"),
    "data show-masked": ("huayu.data.whole_word_masking:show", "Print masked-LM or blank-infilling samples masked and unmasked, with their labels"),
    "tokenizer train": ("huayu.tokenizer:train", "Train a Chinese tokenizer (char or BPE) in HF format"),
    "pretrain": ("huayu.train.pretrain", "Pre-train a model (causal LM, span corruption, masked LM or GLM's blank infilling)"),
    "sft": ("huayu.train.sft", "Supervised fine-tuning on dialogues or instructions"),
    "finetune-cls": ("huayu.train.classify", "Fine-tune an encoder (or a GLM, as cloze) for text classification (TSV/CSV), keep the best by accuracy"),
    "rm": ("huayu.train.reward", "Train a reward model on preference pairs (pairwise loss), keep the best by accuracy"),
    "rm score": ("huayu.train.reward:score", "Score replies, or preference pairs (accuracy, margin), with a reward model"),
    "rm compare": ("huayu.train.reward:compare", "Win rate of models against a baseline on held-out prompts, judged by a reward model"),
    "dpo": ("huayu.train.dpo", "Preference optimisation of an SFT model on pairs: DPO (frozen reference) or SimPO"),
    "plan": ("huayu.plan", "Will it fit? Memory of a training step (or inference) by kind, from the config alone"),
    "eval": ("huayu.evaluation.evaluate", "Static evaluation: loss/ppl, BLEU-4, Dist-n, F1, ROUGE; general-set loss"),
    "metrics": ("huayu.evaluation.metrics_command", "Score hypothesis lines against reference lines"),
    "export merge": ("huayu.export:merge", "Merge a LoRA adapter into its base model (a plain HF model)"),
    "export reshard": ("huayu.export:reshard", "Write a model as safetensors shards of a chosen size, with an index"),
    "quantize": ("huayu.export:quantize", "Weight-only int8 / group-wise int4 quantization of a generative model for the CPU"),
    "export onnx": ("huayu.deploy:onnx", "Export a text classifier to ONNX (checked against PyTorch)"),
    "predict": ("huayu.deploy:predict", "Batched classification of texts from a file or stdin (ONNX Runtime or PyTorch)"),
    "generate": ("huayu.generation_command", "Generate continuations for prompts"),
    "chat": ("huayu.chat", "Interactive multi-turn chat in the terminal (or piped stdin)"),
    "serve": ("huayu.serve.server", "OpenAI-compatible HTTP API (/v1/chat/completions, ...) with dynamic batching"),
    "webui": ("huayu.serve.webui", "A Gradio chat page in the browser"),
    "recipe run": ("huayu.recipes:run", "Run a multi-stage training recipe (YAML); finished stages are skipped"),
    "demo": ("huayu.demo", "Train, evaluate and chat with a tiny model on the bundled corpus"),
}

# the commands that load a model or adapter from a directory
LOADS_MODELS = {"pretrain", "sft", "finetune-cls", "rm", "rm score", "rm compare", "dpo", "eval", "export merge",
                "export reshard", "quantize", "export onnx", "predict", "generate", "chat", "serve", "webui",
                "recipe run"}
# ... and those that read a checkpoint's config or tokenizer, which may need the checkpoint's own code
READS_CHECKPOINTS = LOADS_MODELS | {"plan", "data inspect", "data index", "data show-masked"}


def _load(target: str):
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    if prefix:
        return getattr(module, f"add_{prefix}_arguments"), getattr(module, f"run_{prefix}")
    return module.add_arguments, module.run


def _top_help() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: huayu COMMAND [options]   (huayu COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of command `name` (main's, recipe stages' and the README test's alike)."""
    target, help_ = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"huayu {name}", description=help_)
    _load(target)[0](parser)
    if name in LOADS_MODELS:
        parser.add_argument(ALLOW_PICKLE_FLAG, action="store_true", help="load pickles: weights stored only as "
                            "pytorch_model.bin, DeepSpeed checkpoints; unpickling can run code, so only for files you "
                            "trust")
    if name in READS_CHECKPOINTS:
        parser.add_argument(TRUST_REMOTE_CODE_FLAG, action="store_true", help="load a checkpoint that ships its own "
                            "Python code (auto_map in config.json, e.g. ChatGLM3): runs that code, so only for "
                            "checkpoints you trust")
    parser.usage = _usage(parser)
    return parser


def _usage(parser: argparse.ArgumentParser) -> str:
    """One line: the positionals, then [options]; argparse's own lists every flag (~35 lines for sft)."""
    positionals = [f"[{a.dest.upper()}]" if a.nargs in ("?", "*") else a.dest.upper()
                   for a in parser._actions if not a.option_strings]
    return " ".join(["%(prog)s", *positionals, "[options]"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from huayu import __version__
        print(__version__)
        return 0
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    if name not in COMMANDS:
        print(f"huayu: unknown command {' '.join(argv[:2])!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    args = build_parser(name).parse_args(argv[len(name.split()):])
    run = _load(COMMANDS[name][0])[1]
    if getattr(args, "allow_pickle_weights", False):
        os.environ[ALLOW_PICKLE_ENV] = "1"  # for this process and the stages a recipe runs
    if getattr(args, "trust_remote_code", False):
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    try:
        return int(run(args) or 0)
    except HuayuError as exc:
        print(f"huayu {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"huayu {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
