"""KdConv: a decoder-only and an encoder-decoder model of about the same size, same data and budget.

KdConv's train split is not available here, so the three dev files (film, music, travel; 450
dialogues) are converted to EVA's text format (`huayu data convert --to eva --window 8`, every turn
after the first is a sample, the context its preceding turns) and split BY DIALOGUE into
train/valid/test (--split-ratio, seeded), so no test context was seen in training. One char
tokenizer is trained on the train part. Both models start from random weights: the `small`
decoder preset (Llama-style) and the `t5-small` encoder-decoder preset, trained with `huayu sft`
for the same --steps, batch, learning rate and lengths, then scored with `huayu eval` (EVA's
metrics: loss of the reference, BLEU-4, Dist-n, F1, ROUGE-L) on the test part with greedy decoding.
Each step of each child is a huayu command, echoed; logs go to OUT/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDCONV = REPO.parent / "shared/data/dialogue/kdconv"
DOMAINS = ("film", "music", "travel")
MODELS = {"decoder (small)": "small", "encoder-decoder (t5-small)": "t5-small"}
EVA_TABLE = [("EVA1.0 (2.8B), before fine-tuning", 3.49, 0.64, 85.94, 13.24),
             ("EVA1.0 (2.8B), fine-tuned", 2.37, 3.94, 72.47, 19.80),
             ("EVA2.0 (2.8B), before fine-tuning", 3.14, 1.02, 82.67, 14.36),
             ("EVA2.0 (2.8B), fine-tuned", 2.09, 4.69, 73.03, 22.91)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/kdconv-comparison")
    p.add_argument("--kdconv", default=str(KDCONV))
    p.add_argument("--split-ratio", default="0.8,0.1,0.1")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-source-length", type=int, default=128)
    p.add_argument("--max-target-length", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--eval-samples", type=int, default=0, help="score only the first N test samples (0: all)")
    p.add_argument("--bf16", action="store_true")
    return p.parse_args(argv)


def huayu(out: Path, name: str, *args) -> None:
    """Run one huayu command as a child, its output in OUT/logs/NAME.log; stop on failure."""
    cmd = [sys.executable, "-m", "huayu.cli", *map(str, args)]
    print("$ huayu " + shlex.join(map(str, args)), flush=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(out / "logs" / f"{name}.log", "w", encoding="utf-8") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"huayu {args[0]} failed: see {out / 'logs' / f'{name}.log'}")


def prepare(args, out: Path) -> Path:
    """EVA-format train/valid/test of all three domains (split by dialogue within each domain)."""
    data = out / "data"
    for domain in DOMAINS:
        huayu(out, f"convert-{domain}", "data", "convert", Path(args.kdconv) / domain / "dev.json", "--to", "eva",
              "--window", 8, "--split-ratio", args.split_ratio, "--out", data / domain)
    for split in ("train", "valid", "test"):
        lines = [line for d in DOMAINS for line in (data / d / f"{split}.txt").read_text(encoding="utf-8").splitlines()]
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{split}: {len(lines):,} samples")
    return data


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    data = prepare(args, out)
    huayu(out, "tokenizer", "tokenizer", "train", "--data", data / "train.txt", "--kind", "char",
          "--vocab-size", 6000, "--out", out / "tokenizer")
    lengths = ["--max-source-length", args.max_source_length, "--max-target-length", args.max_target_length]
    rows = []
    for label, preset in MODELS.items():
        run = out / preset
        start = time.perf_counter()
        huayu(out, f"sft-{preset}", "sft", "--model", preset, "--tokenizer", out / "tokenizer", "--data", data,
              "--valid-data", data / "valid.txt", "--max-steps", args.steps, "--batch-size", args.batch_size,
              "--lr", args.lr, "--warmup-steps", args.steps // 10, "--schedule", "cosine", "--bf16", args.bf16,
              *lengths, "--out", run)
        train_s = time.perf_counter() - start
        huayu(out, f"eval-{preset}", "eval", run, "--data", data, "--split", "test", "--out", run / "eval",
              "--batch-size", 32, "--max-new-tokens", args.max_new_tokens, "--max-samples", args.eval_samples,
              *lengths)
        metrics = json.loads((run / "eval/metrics.json").read_text())
        params = json.loads((run / "config.json").read_text())
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        n_params = next((line for line in (out / "logs" / f"sft-{preset}.log").read_text().splitlines()
                         if " parameters, " in line), "").split(": ")[-1].split(" parameters")[0]
        rows.append((label, params["model_type"], n_params, metrics, train_s, log[-1].get("train_tokens_per_s")))
    report(args, rows)


def report(args, rows) -> None:
    print(f"\n{args.steps} steps x batch {args.batch_size}, lr {args.lr} cosine, lengths "
          f"{args.max_source_length}/{args.max_target_length}, greedy decoding of up to {args.max_new_tokens} tokens")
    print("| model | parameters | test samples | loss | ppl | BLEU-4 | Dist-1 | Dist-2 | Dist-4 | F1 | ROUGE-L | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _, n, m, train_s, _ in rows:
        print(f"| {label} | {n} | {m['samples']} | {m['loss']:.2f} | {m['ppl']:.1f} | {m['bleu4']:.2f} | {m['dist1']:.2f} | "
              f"{m['dist2']:.2f} | {m['dist4']:.2f} | {m['f1']:.2f} | {m['rouge_l']:.2f} | {train_s:.0f} |")
    print("\nEVA's published KdConv numbers (2.8B models, KdConv's own test split; from thu-coai/EVA's README):")
    print("| model | loss | BLEU-4 | Dist-4 | F1 |\n|---|---|---|---|---|")
    for name, loss, bleu, dist4, f1 in EVA_TABLE:
        print(f"| {name} | {loss} | {bleu} | {dist4} | {f1} |")


if __name__ == "__main__":
    main()
