"""`huayu demo`: the whole path on a small Chinese corpus, in a few minutes on a laptop CPU.

It runs the same CLI commands a user would type (each is printed first): tokenizer -> pre-training
-> SFT -> evaluation -> a short chat. The corpus is chatterbot-corpus's Chinese conversations
(BSD-3-Clause, installed from PyPI by `make setup`), or any directory of its YAML files.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.errors import HuayuError
from huayu.outputs import OVERWRITE_HELP, check_output_dir, claim_output_dir

GREETINGS = ["你好", "你是谁？", "你喜欢什么？", "再见"]


@dataclass
class DemoConfig:
    out: str = field_doc("working directory: new or empty, or an earlier demo's (which is replaced)",
                         default="out/demo")
    corpus: str | None = field_doc("directory of chatterbot-style YAML files (default: chatterbot-corpus's Chinese)",
                                   default=None)
    pretrain_steps: int = field_doc("pre-training steps", default=200)
    sft_epochs: float = field_doc("fine-tuning epochs", default=6.0)
    test_every: int = field_doc("hold out every N-th conversation for evaluation", default=10)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)


def default_corpus() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise HuayuError("chatterbot-corpus is not installed: `pip install chatterbot-corpus` "
                         "(make setup does it) or pass --corpus DIR")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "chinese"


def _huayu(*args: str) -> None:
    """Run one huayu command as a user would, echoing it first."""
    from huayu.cli import main

    print(f"\n$ huayu {shlex.join(args)}", flush=True)
    if main(list(args)) != 0:
        raise HuayuError(f"`huayu {args[0]}` failed")


def prepare_data(corpus: Path, data: Path, test_every: int) -> None:
    """Split the conversations into train/test JSONL and write the pre-training text."""
    from huayu.data.formats import read_dialogues

    dialogues = [d for f in sorted(corpus.glob("*.yml")) for d in read_dialogues(f, fmt="chatterbot").records]
    if not dialogues:
        raise HuayuError(f"no conversations found in {corpus}")
    data.mkdir(parents=True, exist_ok=True)
    split = {"train": [d for i, d in enumerate(dialogues) if i % test_every],
             "test": [d for i, d in enumerate(dialogues) if i % test_every == 0]}
    for name, rows in split.items():
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in rows:
                f.write(json.dumps({"messages": d.messages}, ensure_ascii=False) + "\n")
    with open(data / "pretrain.txt", "w", encoding="utf-8") as f:
        for d in split["train"]:
            f.write("".join(m["content"] for m in d.messages) + "\n")
    print(f"{len(dialogues)} conversations from {corpus}: {len(split['train'])} train, "
          f"{len(split['test'])} test")


def run_demo(cfg: DemoConfig) -> None:
    out = Path(cfg.out)
    corpus = Path(cfg.corpus) if cfg.corpus else default_corpus()
    if check_output_dir(out, "demo", cfg.overwrite):
        print(f"replacing the earlier demo in {out}")
        shutil.rmtree(out)  # huayu's own output, recognised by its record
    claim_output_dir(out, "demo", cfg.overwrite)
    data = out / "data"
    prepare_data(corpus, data, cfg.test_every)
    _huayu("tokenizer", "train", "--data", str(data / "pretrain.txt"), "--kind", "char",
           "--vocab-size", "4000", "--out", str(out / "tokenizer"))
    _huayu("pretrain", "--model", "tiny", "--tokenizer", str(out / "tokenizer"), "--data",
           str(data / "pretrain.txt"), "--seq-len", "128", "--batch-size", "16", "--lr", "2e-3",
           "--max-steps", str(cfg.pretrain_steps), "--warmup-steps", "30", "--log-every", "50",
           "--out", str(out / "pretrain"))
    _huayu("sft", "--model", str(out / "pretrain"), "--data", str(data / "train.jsonl"), "--valid-data",
           str(data / "test.jsonl"), "--epochs", str(cfg.sft_epochs), "--batch-size", "16", "--lr", "1e-3",
           "--warmup-steps", "20", "--log-every", "50", "--max-source-length", "96",
           "--max-target-length", "64", "--out", str(out / "sft"))
    _huayu("eval", str(out / "sft"), "--data", str(data / "test.jsonl"), "--out", str(out / "eval"),
           "--max-new-tokens", "48")
    typed = "\\n".join(GREETINGS)
    print(f"\n$ printf '{typed}\\n' | huayu chat {out / 'sft'} --beam")
    replies = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", str(out / "sft"), "--beam",
                              "--max-new-tokens", "48"], input="\n".join(GREETINGS) + "\n",
                             capture_output=True, text=True, check=True).stdout.splitlines()
    for user, reply in zip(GREETINGS, replies):
        print(f"用户 >>> {user}\n模型 >>> {reply}")


def add_arguments(parser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args) -> None:
    run_demo(config_from_args(DemoConfig, args))
