"""Full vs LoRA vs P-Tuning v2 (prefix) vs freeze fine-tuning of one base on the same data, steps
and batch size, in the shape of ChatGLM's ADGEN table. Each method is a `huayu sft` child process,
then a `huayu eval` child (`--adapter` on the base for lora/prefix; greedy); the base is evaluated
once on the general text alone. All output stays in --out (logs/: each child's stdout, stderr).

Data (OUT/data): training = --instruct (alpaca) without its last --eval-samples records + the first
--dialogues lines of --dialogue (role map client=user,counselor=assistant, which only adds role
names, and --skip-invalid). Held out: those last alpaca records (eval set) and the LAST
--general-docs documents of --general, streamed and cut to --general-chars characters (some run to
100k+). A base pre-trained on all of --general has seen them; before -> after still shows forgetting.

Columns: trainable = the sft run's own "N parameters, M trainable (P%)" line (tied weights once, %
of all parameters incl. the adapter). peak MB = ru_maxrss of that sft child alone, from os.wait4 on
its pid (RUSAGE_CHILDREN is a running max over all children). samples/s = batch size x optimiser
steps between the first and last "step N/M" log lines of the sft run / the time between them (the
parent stamps each stdout line as it arrives): training steps only, no start-up, tokenization,
first log window or saving. eval loss = `huayu eval` loss of the held-out references. BLEU-4,
ROUGE-L = metrics.json "adgen" (ChatGLM-6B ptuning convention, %); EVA BLEU-4 = EVA's corpus
BLEU-4 (%). general loss = base -> fine-tuned.

Runs: cosine, warm-up steps//10, AdamW; peak lr full 1e-4, lora 1e-3 (rank 8, alpha 16, attention
projections), prefix 1e-2 (16 virtual tokens), freeze 1e-4 (last 2 layers): adapters want 10-100x
the full rate. --smoke builds a base (char tokenizer on 300 documents cut to 1,000 characters + the
training data; `tiny` pre-trained on them for 20 steps) and shrinks every size, to test the script.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data"
ROLE_MAP = "client=user,counselor=assistant"
LR = {"full": 1e-4, "lora": 1e-3, "prefix": 1e-2, "freeze": 1e-4}
SMOKE = dict(dialogues=20, steps=6, batch_size=4, eval_samples=4, general_docs=5, general_chars=300,
             max_new_tokens=8, max_source_length=64, max_target_length=32)
PARAMS = re.compile(r"([\d,]+) parameters, ([\d,]+) trainable \(([\d.]+)%\); ([\d,]+) training examples")
STEP = re.compile(r"step (\d+)/\d+: loss")
HEADER = ["method", "trainable", "%", "peak MB", "samples/s", "eval loss", "BLEU-4", "ROUGE-L",
          "EVA BLEU-4", "general loss", "sft s", "eval s"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every option's default."""


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; --smoke swaps in the SMOKE sizes as defaults (options given still win)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    add = p.add_argument
    add("--smoke", action="store_true", help=f"build a tiny base; defaults become {SMOKE}")
    add("--base", help="pre-trained model directory (required unless --smoke)")
    add("--instruct", default=str(SHARED / "instruct/alpaca_zh_demo.json"), help="alpaca JSON list")
    add("--dialogue", default=str(SHARED / "dialogue/smilechat.jsonl.gz"), help="conversation JSONL(.gz)")
    add("--dialogues", type=int, default=300, help="use the first N lines of --dialogue")
    add("--general", default=str(SHARED / "pretrain/modern-zh.jsonl.gz"), help="JSONL(.gz) with a text field")
    add("--general-docs", type=int, default=50, help="the last N documents of --general are the general set")
    add("--general-chars", type=int, default=2000, help="... each cut to its first N characters")
    add("--steps", type=int, default=150, help="optimiser steps per method")
    add("--batch-size", type=int, default=8, help="examples per step (sft and eval)")
    for method, lr in LR.items():
        add(f"--lr-{method}", type=float, default=lr, help=f"peak learning rate of {method}")
    add("--lora-rank", type=int, default=8, help="lora rank (alpha: huayu's default 16)")
    add("--pre-seq-len", type=int, default=16, help="prefix: virtual tokens per layer")
    add("--freeze-layers", type=int, default=2, help="freeze: train the last N layers")
    add("--max-source-length", type=int, default=256, help="sft/eval context tokens")
    add("--max-target-length", type=int, default=128, help="sft/eval reply tokens")
    add("--eval-samples", type=int, default=50, help="held-out alpaca records (the last N)")
    add("--max-new-tokens", type=int, default=64, help="greedy decoding length in eval")
    add("--methods", default=",".join(LR), help="comma-separated subset of " + ",".join(LR))
    add("--out", help="output directory, kept (default: a new temporary directory)")
    add("--markdown", help="also write the report (command, date, machine, table) as markdown here")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if not (args.base or args.smoke) or set(args.methods) - set(LR) or min(args.steps, args.eval_samples) < 1:
        p.error(f"--base (or --smoke) is required, --methods among {','.join(LR)}, --steps/--eval-samples >= 1")
    return args


def open_lines(path: str | Path):
    """A text file's lines, gunzipped on the fly for .gz."""
    return (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8")


def cut_texts(lines, chars: int) -> str:
    """JSONL records with their "text" cut to the first `chars` characters."""
    records = [json.loads(line) for line in lines if line.strip()]
    return "".join(json.dumps({**r, "text": r["text"][:chars]}, ensure_ascii=False) + "\n" for r in records)


def prepare_data(args, out: Path) -> dict[str, Path]:
    """Write the training and held-out alpaca parts, the dialogue subset and the general slice
    under `out/data`; return their paths."""
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {"train": d / "instruct_train.json", "eval": d / "instruct_eval.json",
             "dialogues": d / "dialogues.jsonl", "general": d / "general_heldout.jsonl"}
    records = json.loads(Path(args.instruct).read_text(encoding="utf-8"))
    if len(records) <= args.eval_samples:
        sys.exit(f"{args.instruct}: {len(records)} records, not more than --eval-samples {args.eval_samples}")
    cut = len(records) - args.eval_samples
    for key, part in (("train", records[:cut]), ("eval", records[cut:])):
        paths[key].write_text(json.dumps(part, ensure_ascii=False, indent=1), encoding="utf-8")
    with open_lines(args.dialogue) as f:
        paths["dialogues"].write_text("".join(itertools.islice(f, args.dialogues)), encoding="utf-8")
    with open_lines(args.general) as f:
        paths["general"].write_text(cut_texts(collections.deque(f, maxlen=args.general_docs),
                                              args.general_chars), encoding="utf-8")
    return paths


def run_huayu(argv: list, log: Path) -> dict:
    """Run `python -m huayu.cli ARGV` as a child: stdout lines stamped on arrival (saved to
    LOG.out), stderr to LOG.err. Return its lines, wall seconds and its own peak RSS in MB."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "huayu.cli", *map(str, argv)]
    t0 = time.perf_counter()
    with open(f"{log}.err", "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO,
                                text=True, encoding="utf-8")
        with proc.stdout:
            lines = [(time.perf_counter(), line) for line in proc.stdout]
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage only
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    Path(f"{log}.out").write_text("".join(line for _, line in lines), encoding="utf-8")
    if proc.returncode:
        tail = Path(f"{log}.err").read_text(encoding="utf-8").splitlines()[-15:]
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return {"lines": lines, "wall": time.perf_counter() - t0, "rss_mb": usage.ru_maxrss / 1024}


def build_smoke_base(args, out: Path, paths: dict) -> str:
    """--smoke: a char tokenizer on the first 300 general documents (cut to 1,000 characters) plus
    the training data (so its characters are known); the `tiny` preset pre-trained on them."""
    docs = out / "data/pretrain_docs.jsonl"
    with open_lines(args.general) as f:
        docs.write_text(cut_texts(itertools.islice(f, 300), 1000), encoding="utf-8")
    run_huayu(["tokenizer", "train", "--data", docs, paths["train"], paths["dialogues"], "--kind", "char",
               "--vocab-size", 6000, "--role-map", ROLE_MAP, "--skip-invalid", "--out", out / "tokenizer"],
              out / "logs/tokenizer")
    run_huayu(["pretrain", "--model", "tiny", "--tokenizer", out / "tokenizer", "--data", docs,
               "--seq-len", 64, "--batch-size", 8, "--lr", 1e-3, "--max-steps", 20, "--log-every", 10,
               "--out", out / "base"], out / "logs/pretrain")
    return str(out / "base")


def train(args, method: str, base: str, paths: dict, out: Path) -> dict:
    """`huayu sft` with `method`: its parameter counts, peak RSS, samples/s and wall time."""
    extra = {"lora": ["--lora-rank", args.lora_rank], "prefix": ["--pre-seq-len", args.pre_seq_len],
             "freeze": ["--freeze-trainable-layers", args.freeze_layers]}.get(method, [])
    run = run_huayu(["sft", "--model", base, "--data", paths["train"], paths["dialogues"],
                     "--role-map", ROLE_MAP, "--skip-invalid", "--finetuning-type", method, *extra,
                     "--lr", getattr(args, f"lr_{method}"), "--max-steps", args.steps,
                     "--batch-size", args.batch_size, "--warmup-steps", args.steps // 10,
                     "--log-every", max(1, args.steps // 10), "--max-source-length", args.max_source_length,
                     "--max-target-length", args.max_target_length, "--cache-dir", out / "cache",
                     "--out", out / method], out / f"logs/sft-{method}")
    found = [m.groups() for _, line in run["lines"] if (m := PARAMS.search(line))]
    if not found:
        sys.exit(f"no 'N parameters, M trainable' line in {out}/logs/sft-{method}.out")
    total, trainable = (int(x.replace(",", "")) for x in found[0][:2])
    steps = [(t, int(m.group(1))) for t, line in run["lines"] if (m := STEP.search(line))]
    (t0, s0), (t1, s1) = steps[0], steps[-1]
    return {"trainable": trainable, "pct": float(found[0][2]), "examples": found[0][3],
            "base_params": total - trainable * (method in ("lora", "prefix")), "rss_mb": run["rss_mb"],
            "samples_s": (s1 - s0) * args.batch_size / (t1 - t0) if s1 > s0 else math.nan, "sft_s": run["wall"]}


def evaluate(args, base: str, paths: dict, out: Path, method: str | None = None) -> dict:
    """metrics.json of `huayu eval` on `method`'s output, or of the base on the general set alone."""
    name = method or "base"
    model = base if method in (None, "lora", "prefix") else out / method
    argv = ["eval", model, "--general-data", paths["general"], "--batch-size", args.batch_size,
            "--out", out / f"eval-{name}"]
    if method:
        argv += ["--data", paths["eval"], "--do-sample", "false", "--num-beams", 1,
                 "--max-new-tokens", args.max_new_tokens, "--max-source-length", args.max_source_length,
                 "--max-target-length", args.max_target_length]
        argv += ["--adapter", out / method] if method in ("lora", "prefix") else []
    run = run_huayu(argv, out / f"logs/eval-{name}")
    return {**json.loads((out / f"eval-{name}/metrics.json").read_text(encoding="utf-8")), "eval_s": run["wall"]}


def cells(method: str, t: dict, e: dict, before: float) -> list[str]:
    """One table row from train()'s `t` and evaluate()'s `e`."""
    return [method, f"{t['trainable']:,}", f"{t['pct']:.2f}", f"{t['rss_mb']:.0f}", f"{t['samples_s']:.2f}",
            f"{e['loss']:.4f}", f"{e['adgen']['bleu-4']:.2f}", f"{e['adgen']['rouge-l']:.2f}",
            f"{e['bleu4']:.2f}", f"{before:.4f} -> {e['general_loss']:.4f}", f"{t['sft_s']:.0f}",
            f"{e['eval_s']:.0f}"]


def fixed_width(rows: list[list[str]]) -> str:
    """The rows under HEADER, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *map(line, rows)])


def notes(args, base: str, first: dict, out: Path, seconds: float) -> list[str]:
    """The report's header lines: machine (nproc, torch threads, load), base, data, settings."""
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"machine: nproc {os.cpu_count()}, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {load} at the end",
            f"base: {base} ({first['base_params']:,} parameters)",
            f"training: {first['examples']} examples ({args.instruct} without its last {args.eval_samples} "
            f"records + the first {args.dialogues} lines of {args.dialogue}); {args.steps} steps x batch "
            f"{args.batch_size}; lr full {args.lr_full}, lora {args.lr_lora} (rank {args.lora_rank}), prefix "
            f"{args.lr_prefix} ({args.pre_seq_len} tokens), freeze {args.lr_freeze} (last {args.freeze_layers} "
            f"layers); max source/target {args.max_source_length}/{args.max_target_length} tokens",
            f"eval: the last {args.eval_samples} alpaca records, greedy, {args.max_new_tokens} new tokens; "
            f"general: the last {args.general_docs} documents of {args.general}, cut to {args.general_chars} chars",
            f"total time {seconds:.0f} s; outputs and logs in {out}"]


def main(argv=None) -> None:
    """Prepare the data (and a --smoke base), evaluate the base, train and evaluate each method, report."""
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="peft_comparison-")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = prepare_data(args, out)
    base = str(Path(args.base).resolve()) if args.base else build_smoke_base(args, out, paths)
    before = evaluate(args, base, paths, out)["general_loss"]
    rows, first = [], None
    for method in args.methods:
        t = train(args, method, base, paths, out)
        first = first or t
        rows.append(cells(method, t, evaluate(args, base, paths, out, method), before))
        print(f"[{time.perf_counter() - start:.0f} s] {method} done", flush=True)
    header = notes(args, base, first, out, time.perf_counter() - start)
    print("\n".join(header) + "\n\n" + fixed_width(rows))
    if args.markdown:
        md = ["# huayu fine-tuning methods compared (ADGEN-style table)", "",
              f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
              f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", *[f"- {n}" for n in header], "",
              *["| " + " | ".join(r) + " |" for r in [HEADER, ["---"] * len(HEADER), *rows]],
              "", "Columns: `python benchmarks/peft_comparison.py --help`."]
        Path(args.markdown).write_text("\n".join(md) + "\n", encoding="utf-8")
        print(f"markdown: {args.markdown}")


if __name__ == "__main__":
    main()
