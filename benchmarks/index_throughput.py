"""`huayu data index` throughput: MB of raw text per second per core, with 1 and 2 worker processes.

Rows (all segment with rjieba and write a complete store; the time excludes reading the corpus):
  huayu, N workers      the whole corpus, huayu's char tokenizer (its array-lookup fast path)
  huayu, general path   the first --sample-mb, the same tokenizer through the `tokenizers` library
                        (the path any BPE / WordPiece tokenizer takes), 1 worker
  per-word baseline     the first --baseline-mb, encoded as PaddleNLP's create_pretraining_data.py
                        does: per document, per sentence, segment, then tokenize word by word (one
                        tokenizer call per word gives the word boundaries), 1 process

Each row's MB/s per core is set against PaddleNLP's claim for ERNIE (14 GB in 40-60 minutes with 48
workers: 14,000 MB / 3,000 s / 48 = 0.097 MB/s per worker) and against the per-word baseline
measured in the same run. Per core = MB/s / min(workers, cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pretrain/modern-zh.jsonl.gz"
PADDLE_MB_S_PER_WORKER = 14_000 / 3_000 / 48


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="corpus (JSONL/.gz or .txt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: a char tokenizer trained "
                   "on the first 20 MB of the corpus, 7,000 tokens)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--sample-mb", type=float, default=20.0, help="text for the general-path row")
    p.add_argument("--baseline-mb", type=float, default=2.0, help="text for the per-word baseline")
    return p.parse_args(argv)


def head(texts: list[str], mb: float) -> list[str]:
    """The first documents of `texts` adding up to about `mb` MB."""
    out, size = [], 0
    for text in texts:
        if size >= mb * 1e6:
            break
        out.append(text)
        size += len(text.encode("utf-8"))
    return out


def megabytes(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def time_index(texts: list[str], tokenizer: str, workers: int, out: str, general: bool = False) -> float:
    from huayu.data import token_store

    cfg = token_store.IndexConfig(corpus=["benchmark"], out=out, tokenizer=tokenizer, workers=workers)
    original = token_store.char_lookup_table
    if general:
        token_store.char_lookup_table = lambda tokenizer: None
    try:
        t0 = time.perf_counter()
        token_store.build_store(cfg, texts, [])
        return time.perf_counter() - t0
    finally:
        token_store.char_lookup_table = original


def time_per_word_baseline(texts: list[str], tokenizer_dir: str) -> float:
    """PaddleNLP-style: sentence by sentence, segment, then one tokenizer call per word."""
    import rjieba

    from huayu.data.token_store import split_sentences
    from huayu.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    t0 = time.perf_counter()
    ids, starts = [], []
    for text in texts:
        for sentence in split_sentences(text):
            for word in rjieba.cut(sentence):
                pieces = tokenizer.encode(word, add_special_tokens=False)
                ids += pieces
                starts += [1] + [0] * (len(pieces) - 1)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    from huayu.data.token_store import IndexConfig, read_documents
    from huayu.tokenizer import train_tokenizer

    cores = os.cpu_count() or 1
    texts = read_documents(IndexConfig(corpus=[args.data]), [])
    print(f"{args.data}: {len(texts):,} documents, {megabytes(texts):,.1f} MB; {cores} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = f"{tmp}/tok"
            train_tokenizer(head(texts, 20), kind="char", vocab_size=7000).save_pretrained(tokenizer)
        rows = []
        baseline_texts = head(texts, args.baseline_mb)
        seconds = time_per_word_baseline(baseline_texts, tokenizer)
        rows.append(("per-word baseline (PaddleNLP-style)", 1, megabytes(baseline_texts), seconds))
        sample = head(texts, args.sample_mb)
        rows.append(("huayu, general tokenizer path", 1, megabytes(sample),
                     time_index(sample, tokenizer, 1, f"{tmp}/general", general=True)))
        for workers in args.workers:
            rows.append((f"huayu, {workers} worker(s)", workers, megabytes(texts),
                         time_index(texts, tokenizer, workers, f"{tmp}/w{workers}")))
    base = rows[0][2] / rows[0][3]
    print(f"\n| run | workers | MB | seconds | MB/s | MB/s per core | x PaddleNLP claim (0.097/worker) "
          f"| x per-word baseline (per core) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, workers, mb, seconds in rows:
        per_core = mb / seconds / min(workers, cores)
        print(f"| {name} | {workers} | {mb:,.1f} | {seconds:,.1f} | {mb / seconds:,.2f} | {per_core:,.2f} | "
              f"{per_core / PADDLE_MB_S_PER_WORKER:,.0f}x | {per_core / base:,.1f}x |")


if __name__ == "__main__":
    main()
