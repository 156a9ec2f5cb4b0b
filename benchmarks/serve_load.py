"""Load test of `huayu serve`: C concurrent clients (1, 4, 16) send chat completions to one server.

The server is a real `huayu serve` child process on 127.0.0.1 (continuous batching, batch <= 16).
Its model is --model, or by default the `small` preset (Llama-style, ~9.5M parameters) with a char
tokenizer trained on the dialogues' text; random weights decode as fast as trained ones, and every request
asks for exactly --max-tokens tokens (`ignore_eos`), so each one does the same work. Prompts are
the first user turns of the first 200 dialogues of --dialogues (SmileChat), cycled.

Per level: C asyncio clients share --requests-per-client x C requests (after 2 warm-up requests);
requests/s and generated tokens/s are over the level's wall time; latency is each request's time to
its whole (non-streamed) reply; failures are non-200 answers or transport errors. The last line is
the ratio of generated tokens/s at the most clients to that of one client (sequential) in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data"
FALLBACK_PROMPTS = ["你好", "今天天气怎么样？", "我最近压力很大，睡不着觉。", "你能给我讲个故事吗？"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory to serve (default: build the small preset)")
    p.add_argument("--dialogues", default=str(SHARED / "dialogue/smilechat.jsonl.gz"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    return p.parse_args(argv)


def load_dialogues(path: str, n: int = 2000) -> list[list[str]]:
    """The turns of the first `n` dialogues of a conversation JSONL(.gz)."""
    if not Path(path).exists():
        return [FALLBACK_PROMPTS]
    dialogues = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            turns = [t.get("content") or "" for t in record.get("conversation") or record.get("messages") or []]
            if turns and turns[0]:
                dialogues.append(turns)
            if len(dialogues) >= n:
                break
    return dialogues or [FALLBACK_PROMPTS]


def build_model(texts: list[str], out: Path) -> Path:
    from huayu.models.loading import count_parameters, load_model
    from huayu.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts + FALLBACK_PROMPTS, kind="char", vocab_size=6000)
    model = load_model("small", tokenizer, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model: small preset, {count_parameters(model)[1] / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    return out


def start_server(model: Path, batch: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "huayu.cli", "serve", str(model), "--port", str(port),
                             "--served-model-name", "bench", "--max-batch-size", str(batch), "--max-queue", "256",
                             "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("huayu serve did not come up")


async def level(url: str, clients: int, total: int, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    latencies, tokens, failures, counter = [], 0, 0, iter(range(total))

    async def one(client, i):
        body = {"model": "bench", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "ignore_eos": True}
        t = time.perf_counter()
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {r.text[:200]}")
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    async def worker(client):
        nonlocal tokens, failures
        for i in counter:
            try:
                latency, n = await one(client, i)
                latencies.append(latency)
                tokens += n
            except Exception as exc:  # counted, and shown once
                failures += 1
                if failures == 1:
                    print(f"  failure: {exc}")

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        for i in range(2):
            await one(client, i)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return dict(clients=clients, requests=total, wall=wall, rps=len(latencies) / wall, tok_s=tokens / wall,
                p50=statistics.median(latencies), p95=q[18], failures=failures)


def main(argv=None) -> None:
    args = parse_args(argv)
    dialogues = load_dialogues(args.dialogues)
    prompts = [d[0][:200] for d in dialogues][:200]
    with tempfile.TemporaryDirectory(prefix="huayu-serve-bench-") as tmp:
        model = Path(args.model) if args.model else build_model([t for d in dialogues for t in d], Path(tmp) / "model")
        proc, url = start_server(model, args.max_batch_size)
        try:
            rows = []
            for c in args.clients:
                total = max(args.min_requests, c * args.requests_per_client)
                rows.append(asyncio.run(level(url, c, total, prompts, args.max_tokens)))
                r = rows[-1]
                print(f"  {c:>3} clients: {r['requests']} requests in {r['wall']:.1f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{args.max_tokens} tokens per request, server batch <= {args.max_batch_size}, 2 warm-up requests per level")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'gen tok/s':>10} {'p50 s':>7} {'p95 s':>7} {'failures':>8}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['rps']:>7.2f} {r['tok_s']:>10,.0f} {r['p50']:>7.2f} "
              f"{r['p95']:>7.2f} {r['failures']:>8}")
    base, top = rows[0], rows[-1]
    print(f"ratio tokens/s at {top['clients']} clients / {base['clients']} client: {top['tok_s'] / base['tok_s']:.2f}x")
    if any(r["failures"] for r in rows):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
