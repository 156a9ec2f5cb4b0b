"""Pre-training throughput: `huayu pretrain` (packed blocks) vs a naive Hugging Face Trainer script.

Both sides train the `small` preset (Llama-style, 10 layers, hidden 256) from the same seed with the
same char tokenizer, documents, seq len, batch size, lr, steps, dtype and threads. huayu packs the
documents into full blocks; the HF side encodes each document alone, truncated and padded to
--seq-len (`padding="max_length"`), collated by DataCollatorForLanguageModeling(mlm=False).

tokens/s = REAL (non-pad) tokens, attention_mask.sum() of the timed steps' batches, per second of
those steps (batching, forward, backward, clipping, optimiser); the first --warmup steps are untimed.
huayu: from log.jsonl's `train_tokens_per_s` rows (one per --warmup steps; a window holds
steps*batch*seq_len tokens, as all packed blocks but at most one are full). HF: a callback stamps
each step's end and an overridden training_step sums the masks.

MFU = tokens/s * (6*N + 12*L*d*T) / peak. N = all parameters (the tied embedding / LM head once: its
matmul costs 2*V*d per token), L layers, d hidden, T = seq len (attention scores and weighted sum,
forward + backward). Peak = best rate of an n x n torch.matmul (n = 512, 1024, 2048; ~1 s each) in
the runs' dtype, measured before every round and after the last.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pretrain/modern-zh.jsonl.gz"
PRESET, LR = "small", 6e-4


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every option's default."""


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; `--help` shows this module's docstring and every option."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL(.gz) corpus with a text field")
    p.add_argument("--docs", type=int, default=400, help="use the first N documents")
    p.add_argument("--vocab-size", type=int, default=6000, help="char tokenizer size (at most)")
    p.add_argument("--seq-len", type=int, default=256, help="block / truncation length")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides, else fp32")
    p.add_argument("--rounds", type=int, default=2, help="rounds in the order huayu, HF, HF, huayu, ...; "
                   "each side's best round is reported (other load on the machine only slows a run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=42, help="model init and data order seed")
    p.add_argument("--verbose", action="store_true", help="show both trainers' own output")
    args = p.parse_args(argv)
    if min(args.warmup, args.steps, args.rounds) < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return args


def prepare(args, tmp: Path):
    """Write the first --docs records to tmp/docs.jsonl, train the shared char tokenizer on them into
    tmp/tokenizer; return (texts, tokenizer)."""
    from huayu.data.formats import read_texts
    from huayu.tokenizer import train_tokenizer

    with (gzip.open if args.data.endswith(".gz") else open)(args.data, "rt", encoding="utf-8") as src:
        lines = [line for _, line in zip(range(args.docs), src)]
    (tmp / "docs.jsonl").write_text("".join(lines), encoding="utf-8")
    texts = [r.text for r in read_texts(tmp / "docs.jsonl").records]
    tokenizer = train_tokenizer(texts, kind="char", vocab_size=args.vocab_size)
    tokenizer.save_pretrained(tmp / "tokenizer")
    return texts, tokenizer


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, sizes=(512, 1024, 2048)) -> float:
    """Best FLOP/s of an n x n torch.matmul in `dtype` over `sizes`, each timed for about `seconds`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        reps, stop = max(3, 2 ** 33 // n ** 3), time.perf_counter() + seconds
        torch.matmul(a, b)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t))
    return best


@contextlib.contextmanager
def quiet(log: Path, verbose: bool):
    """Send a trainer's stdout/stderr to `log` unless --verbose."""
    if verbose:
        yield
        return
    with log.open("w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def run_huayu(args, tmp: Path, out: Path) -> float:
    """Train with `huayu pretrain` into `out`; real tokens/s over the log windows after the warm-up."""
    from huayu.cli import main

    argv = ["pretrain", "--model", PRESET, "--tokenizer", str(tmp / "tokenizer"),
            "--data", str(tmp / "docs.jsonl"), "--out", str(out), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--max-steps", str(args.warmup + args.steps),
            "--log-every", str(args.warmup), "--save-every", "0", "--lr", str(LR), "--seed", str(args.seed),
            "--bf16", str(args.bf16)]
    with quiet(out.with_suffix(".log"), args.verbose):
        if main(argv):
            raise SystemExit(f"huayu pretrain failed; see {out.with_suffix('.log')}")
    lines = (out / "log.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [r for r in map(json.loads, lines) if "train_tokens_per_s" in r]
    tokens = seconds = 0.0
    for prev, row in zip(rows, rows[1:]):  # rows[0] is the warm-up window
        window = (row["step"] - prev["step"]) * args.batch_size * args.seq_len
        tokens, seconds = tokens + window, seconds + window / row["train_tokens_per_s"]
    return tokens / seconds


def hf_rows(texts: list[str], tokenizer, seq_len: int):
    """The naive HF dataset: one row per document, truncated and padded to `seq_len`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=seq_len),
        batched=True, remove_columns=["text"])


def run_hf(args, config, rows, tokenizer, out: Path) -> tuple[float, float]:
    """Train a plain transformers.Trainer on the padded `rows` into `out`;
    return (real tokens/s, real-token share of the timed steps)."""
    from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    real, ends = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            real.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(args.seed)
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                              max_steps=args.warmup + args.steps, learning_rate=LR, bf16=args.bf16,
                              use_cpu=True, seed=args.seed, report_to="none", save_strategy="no")
    trainer = CountingTrainer(model=AutoModelForCausalLM.from_config(config), args=targs,
                              train_dataset=rows, callbacks=[Clock()],
                              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with quiet(out.with_suffix(".log"), args.verbose):
        trainer.train()
    timed = sum(real[args.warmup:])
    return timed / (ends[-1] - ends[args.warmup - 1]), timed / (args.steps * args.batch_size * args.seq_len)


def corpus_shares(texts: list[str], tokenizer, seq_len: int) -> tuple[float, float, float]:
    """(huayu's real-token share of its packed blocks, the HF rows' real-token share,
    the share of the documents' tokens that the truncated HF rows keep)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = [len(e.ids) for e in encodings]
    packed = sum(lengths) + len(lengths)  # huayu appends EOS to every document
    kept = sum(min(n, seq_len) for n in lengths)
    blocks = math.ceil(packed / seq_len)
    return packed / (blocks * seq_len), kept / (len(lengths) * seq_len), kept / sum(lengths)


def run_rounds(args, tmp: Path, config, texts: list[str], tokenizer, share: float) -> tuple[dict, float]:
    """Alternate the sides (huayu, HF, HF, huayu, ...), measuring the matmul peak before each round
    and after the last; return ({side: [(tokens/s, real-token share) per round]}, best peak FLOP/s)."""
    rows = hf_rows(texts, tokenizer, args.seq_len)
    sides = {"huayu pretrain": lambda out: (run_huayu(args, tmp, out), share),
             "HF Trainer": lambda out: run_hf(args, config, rows, tokenizer, out)}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    results, peak = {name: [] for name in sides}, 0.0
    for r in range(args.rounds):
        peak = max(peak, matmul_peak(dtype))
        for name in list(sides)[::-1 if r % 2 else 1]:
            tok_s, real = sides[name](tmp / f"{name.split()[0]}-{r}")
            results[name].append((tok_s, real))
            print(f"round {r + 1}: {name:<15}{tok_s:>7,.0f} tokens/s, {real:6.1%} real   "
                  f"(1-min load average after: {os.getloadavg()[0]:.1f})", flush=True)
    return results, max(peak, matmul_peak(dtype))


def report(args, n_params: int, flops_tok: float, peak: float, results: dict, shares) -> None:
    """Print the settings and the table of each side's best round."""
    dtype = "bf16" if args.bf16 else "fp32"
    print(f"\nmodel: {PRESET} preset, {n_params / 1e6:.2f}M parameters; FLOPs/token = 6*N + 12*L*d*T "
          f"= {flops_tok / 1e6:.1f}M; seq {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, {dtype}, {torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"HF rows over all {args.docs} docs: {shares[1]:.1%} real tokens ({1 - shares[1]:.1%} padding); "
          f"truncation keeps {shares[2]:.1%} of the documents' tokens\n")
    print(f"{'side':<16}{'tokens/s':>10}{'MFU':>8}   real-token share")
    best = {name: max(runs) for name, runs in results.items()}
    for name, (tok_s, share) in best.items():
        print(f"{name:<16}{tok_s:>10,.0f}{tok_s * flops_tok / peak:>8.1%}   {share:.1%}")
    print(f"{'ratio huayu/HF':<16}{best['huayu pretrain'][0] / best['HF Trainer'][0]:>9.2f}x")
    print(f"matmul peak: {peak / 1e9:,.1f} GFLOP/s ({dtype}, best n x n matmul, n = 512/1024/2048, "
          f"measured {args.rounds + 1} times)")


def main(argv=None) -> None:
    """Prepare the documents and tokenizer, run the rounds, print the table."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from huayu.models.loading import count_parameters
    from huayu.models.presets import decoder_config

    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # its handler writes to the real stderr, past quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="huayu-bench-") as name:
        tmp = Path(name)
        texts, tokenizer = prepare(args, tmp)
        special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
        config = decoder_config(PRESET, len(tokenizer), special)
        n_params = count_parameters(AutoModelForCausalLM.from_config(config))[1]
        flops_tok = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len
        shares = corpus_shares(texts, tokenizer, args.seq_len)
        print(f"{len(texts)} docs, vocab {len(tokenizer)}", flush=True)
        results, peak = run_rounds(args, tmp, config, texts, tokenizer, shares[0])
        report(args, n_params, flops_tok, peak, results, shares)


if __name__ == "__main__":
    main()
