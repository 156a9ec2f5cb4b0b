"""One-GPU check of huayu's inference (issue 20): `huayu generate`'s decoding and `huayu serve` on a ~0.4B Qwen2
in bf16, beside plain transformers `generate()` in the same run.

One command, no downloads (nothing is read from the Hub), sized for under 3 minutes on one H100/H200 (not yet
measured there):

    PYTHONPATH=. python benchmarks/gpu_inference_check.py             # needs CUDA; exits 2 without it
    PYTHONPATH=. python benchmarks/gpu_inference_check.py --smoke     # CPU, tiny model, fp32: checks the script (~10 s)

Exit status: 0; 1 when a row came short (a failed request, fewer tokens than asked) or the server did not start;
2 without CUDA. Greedy tokens that differ from HF's are reported, not counted as a failure.

The model is benchmarks/gpu_check.py's (its builders are imported, not copied): a byte-level BPE of ~21k tokens
trained on random Chinese, and Qwen2ForCausalLM with Qwen2-0.5B's body (hidden 896, 24 layers, 14/2 heads,
intermediate 4864, tied embeddings), random weights, saved in bf16 with its tokenizer as a downloaded checkpoint
is (--smoke: a tiny one, fp32). The embedding rows of the special tokens (<|im_end|>, the end of a reply, among
them) are zeroed: with random weights, a zero logit is never the greedy choice, so no row of either side ends
early and both do the same work. The tokens column counts what each side actually returned (up to each row's
end), so a row that did end early would show there.

generate  batch 1 and 32 (--smoke: 1 and 4); prompts of --prompt-len tokens of random Chinese (all the same
          length: no padding); --new-tokens greedy tokens per row.
  huayu   Generator.load(DIR, placement=InferenceArgs(device, torch_dtype)).new_ids(...): huayu's own loop, eager
          (what `huayu generate` decodes with)
  HF      AutoModelForCausalLM.from_pretrained(DIR, dtype).to(device).generate(input_ids, attention_mask,
          max_new_tokens, do_sample=False), the same inputs and end tokens
  tokens/s = tokens generated / wall time (torch.cuda.synchronize() around it), best of --rounds after one
  untimed warm-up call per side and batch size. `same as HF`: huayu's greedy tokens against HF's; bf16 may
  legitimately diverge late, so the first differing position is shown rather than counted a failure.
serve     `huayu serve DIR --device cuda --torch-dtype bfloat16 --max-batch-size 64 --max-queue 256` (needs fastapi
          and uvicorn), a child process on 127.0.0.1. After one warm-up request, 32 then 128 clients (--smoke: 4
          and 8; one thread each, standard-library HTTP) each send one /v1/completions request at once: a prompt
          of --prompt-len random Chinese characters, greedy, max_tokens --serve-tokens, ignore_eos.
  tokens/s = completion tokens (the responses' usage) / the level's wall time; p50/p95: per-request latency
  (queueing included); failures: non-200 answers and transport errors; largest batch: the engine's (/health).
"""

from __future__ import annotations

import argparse
import gc
import http.client
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVED_NAME = "bench"
GPU_DEFAULTS = dict(prompt_len=128, new_tokens=128, serve_tokens=64, batch_sizes=[1, 32], clients=[32, 128],
                    max_batch_size=64, max_queue=256, rounds=2, chars=20000)
SMOKE_DEFAULTS = dict(prompt_len=32, new_tokens=8, serve_tokens=8, batch_sizes=[1, 4], clients=[4, 8],
                      max_batch_size=4, max_queue=16, rounds=1, chars=300)


def gpu_check_module():
    """benchmarks/gpu_check.py, whose model and tokenizer builders this check shares."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _defaults(key: str) -> str:
    return f"default {GPU_DEFAULTS[key]}; --smoke {SMOKE_DEFAULTS[key]}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: checks the script, not the GPU")
    p.add_argument("--prompt-len", type=int,
                   help=f"prompt tokens per row ({_defaults('prompt_len')}); serve: characters, about as many tokens")
    p.add_argument("--new-tokens", type=int, help=f"generate: new tokens per row ({_defaults('new_tokens')})")
    p.add_argument("--serve-tokens", type=int, help=f"serve: max_tokens per request ({_defaults('serve_tokens')})")
    p.add_argument("--batch-sizes", type=int, nargs="+", help=f"generate ({_defaults('batch_sizes')})")
    p.add_argument("--clients", type=int, nargs="+", help=f"serve: concurrent clients per level "
                   f"({_defaults('clients')})")
    p.add_argument("--max-batch-size", type=int, help=f"huayu serve --max-batch-size ({_defaults('max_batch_size')})")
    p.add_argument("--max-queue", type=int, help=f"huayu serve --max-queue ({_defaults('max_queue')})")
    p.add_argument("--rounds", type=int, help=f"generate: timed calls after the warm-up; the best counts "
                   f"({_defaults('rounds')})")
    p.add_argument("--chars", type=int, help=f"distinct CJK characters; the tokenizer has about 1,000 tokens more "
                   f"({_defaults('chars')})")
    p.add_argument("--model-vocab", type=int, default=0, help="embedding rows of the model (0: the tokenizer's size "
                   "rounded up to 64; 151936 gives Qwen2-0.5B's 0.49B parameters and LM-head cost)")
    p.add_argument("--server-timeout", type=int, default=300, help="seconds for huayu serve to answer /health")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--keep", help="build in this directory and keep it, the server's log included (default: a "
                   "temporary directory, deleted)")
    args = p.parse_args(argv)
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [args.prompt_len, args.new_tokens, args.serve_tokens, args.rounds, args.max_batch_size, args.max_queue,
             *args.batch_sizes, *args.clients]
    if min(sizes) < 1:
        p.error("every size and count must be positive")
    if max(args.clients) > args.max_batch_size + args.max_queue:
        p.error("--clients: more than the server holds (--max-batch-size + --max-queue) would be refused")
    return args


# -- the checkpoint ---------------------------------------------------------------------------

def build_checkpoint(args, gpu_check, directory: Path) -> dict:
    """Tokenizer and random Qwen2 saved in `directory` (bf16 for the GPU, fp32 with --smoke); what was built."""
    import torch

    shape = gpu_check.SHAPES["smoke" if args.smoke else "gpu"]
    tok = gpu_check.build_tokenizer(gpu_check.cjk_pool(args.chars), 32768, seed=0)
    vocab = args.model_vocab or -(-len(tok) // 64) * 64
    if vocab < len(tok):
        raise SystemExit(f"gpu_inference_check: error: --model-vocab {vocab} is smaller than the tokenizer "
                         f"({len(tok)})")
    model, _ = gpu_check.build_model(shape, vocab, tok, seed=0)
    with torch.no_grad():  # tied: the LM head's rows too, so greedy decoding never picks a special token
        model.get_input_embeddings().weight[tok.all_special_ids] = 0
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.float32 if args.smoke else torch.bfloat16).save_pretrained(directory)
    tok.save_pretrained(directory)
    hidden, layers, heads, kv_heads, inter = shape
    return {"params": params, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "inter": inter,
            "vocab": vocab, "tokenizer_size": len(tok), "dtype": "float32" if args.smoke else "bfloat16"}


def random_texts(gpu_check, args, n: int, length: int, seed: int) -> list[str]:
    pool = gpu_check.cjk_pool(args.chars)
    rng = random.Random(seed)
    return [gpu_check.random_text(rng, pool, length) for _ in range(n)]


# -- generate -------------------------------------------------------------------------------------

def best_time(fn, rounds: int, sync) -> tuple[float, list]:
    """(best wall seconds, result) of `rounds` timed calls after one untimed warm-up call."""
    fn()
    best, result = float("inf"), None
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def first_difference(ours: list[list[int]], theirs: list[list[int]]) -> int | None:
    """The earliest token position where any row differs (a length difference counts); None if all equal."""
    positions = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(ours, theirs) if x != y]
    return min(positions, default=None)


def run_generate(args, gpu_check, model_dir: Path, cuda: bool) -> list[dict]:
    """huayu's Generator and HF generate() on the same prompts, for each batch size: one row per side."""
    import torch
    from transformers import AutoModelForCausalLM

    from huayu.generation import DecodingArgs, Generator
    from huayu.models.loading import InferenceArgs

    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = Generator.load(str(model_dir), placement=InferenceArgs(device=device, torch_dtype=dtype))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    ends = set(gen.eos_ids)
    decoding = DecodingArgs(max_new_tokens=args.new_tokens)
    texts = random_texts(gpu_check, args, max(args.batch_sizes), 2 * args.prompt_len, seed=1)
    prompts = [gen.encode_text(t)[:args.prompt_len] for t in texts]
    if min(map(len, prompts)) < args.prompt_len:
        raise SystemExit(f"gpu_inference_check: error: a prompt text gave fewer than {args.prompt_len} tokens")

    def hf_generate(batch):
        ids = torch.tensor(batch, device=gen.device)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=gen.eos_ids)
        rows = out[:, ids.shape[1]:].tolist()
        return [r[:next((i for i, t in enumerate(r) if t in ends), len(r))] for r in rows]

    rows = []
    for size in args.batch_sizes:
        batch = prompts[:size]
        ours_s, ours = best_time(lambda: gen.new_ids(batch, decoding), args.rounds, sync)
        theirs_s, theirs = best_time(lambda: hf_generate(batch), args.rounds, sync)
        diverges_at = first_difference(ours, theirs)
        for side, seconds, out in (("huayu", ours_s, ours), ("HF", theirs_s, theirs)):
            tokens = sum(map(len, out))
            rows.append({"side": side, "batch": size, "tokens": tokens, "expected_tokens": size * args.new_tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds})
        rows[-2].update(same_as_hf=diverges_at is None, first_difference=diverges_at,
                        rows_same=sum(a == b for a, b in zip(ours, theirs)),
                        speed_vs_hf=rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"])
        print(f"  generate batch {size:>3}: huayu {rows[-2]['tokens_per_s']:,.0f} tokens/s, "
              f"HF {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    del gen, hf
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the server's process needs the GPU next
    return rows


# -- serve ----------------------------------------------------------------------------------------

def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request to 127.0.0.1:`port`, on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode("utf-8", errors="replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, {"text": text[:300]}
    finally:
        conn.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir: Path, cuda: bool, log: Path) -> tuple[subprocess.Popen, int]:
    """`huayu serve` in a child process, once it answers /health; (process, port)."""
    port = free_port()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "huayu.cli", "serve", str(model_dir), "--device", device, "--torch-dtype", dtype,
           "--port", str(port), "--served-model-name", SERVED_NAME, "--max-batch-size", str(args.max_batch_size),
           "--max-queue", str(args.max_queue), "--log-level", "warning"]
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.server_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                return proc, port
        except (OSError, http.client.HTTPException):  # not listening yet
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"huayu serve did not answer /health (exit code {proc.returncode}); its log:\n{log_tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) if log.exists() else ""


def completion(port: int, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(latency s, completion tokens, prompt tokens) of one greedy /v1/completions request; raises on failure."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    status, reply = request(port, "POST", "/v1/completions", body)
    latency = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {json.dumps(reply, ensure_ascii=False)[:300]}")
    return latency, reply["usage"]["completion_tokens"], reply["usage"]["prompt_tokens"]


def serve_level(port: int, prompts: list[str], max_tokens: int) -> dict:
    """One request per prompt, all released at once from threads of their own."""
    clients = len(prompts)
    release = threading.Barrier(clients + 1)

    def client(prompt):
        release.wait(timeout=60)
        try:
            return completion(port, prompt, max_tokens)
        except Exception as exc:  # counted as a failure; the first is shown
            return exc

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, p) for p in prompts]
        release.wait(timeout=60)
        start = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
    done = [r for r in results if not isinstance(r, Exception)]
    errors = [r for r in results if isinstance(r, Exception)]
    latencies = sorted(r[0] for r in done)
    tokens = sum(r[1] for r in done)
    return {"clients": clients, "completed": len(done), "failures": len(errors),
            "first_failure": f"{type(errors[0]).__name__}: {errors[0]}" if errors else None,
            "completion_tokens": tokens, "expected_tokens": clients * max_tokens,
            "mean_prompt_tokens": statistics.fmean(r[2] for r in done) if done else 0.0, "seconds": wall,
            "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies) if latencies else None,
            "p95_s": statistics.quantiles(latencies, n=20, method="inclusive")[18] if len(latencies) > 1 else
            (latencies or [None])[0],
            "largest_batch": request(port, "GET", "/health", timeout=10)[1].get("largest_batch")}


def run_serve(args, gpu_check, model_dir: Path, cuda: bool, work: Path) -> dict:
    """The serve levels' rows, or why they were not run."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"huayu serve needs {' and '.join(missing)}, not installed here"}
    log = work / "serve.log"
    proc, port = start_server(args, model_dir, cuda, log)
    try:
        completion(port, random_texts(gpu_check, args, 1, args.prompt_len, seed=2)[0], args.serve_tokens)  # warm-up
        rows = []
        for clients in args.clients:
            rows.append(serve_level(port, random_texts(gpu_check, args, clients, args.prompt_len, seed=3 + clients),
                                    args.serve_tokens))
            print(f"  serve {clients:>3} clients: {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
                  f"{rows[-1]['failures']} failures", flush=True)
    finally:
        stop_server(proc)
    return {"rows": rows, "log_tail": log_tail(log) if any(r["failures"] for r in rows) else ""}


# -- the report -----------------------------------------------------------------------------------

def fmt_seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def report(args, summary: dict) -> None:
    """The compact table."""
    model = summary["model"]
    print("\n" + "=" * 92)
    print(f"gpu_inference_check: {summary['device']}; transformers {summary['transformers']}")
    print(f"model: Qwen2 arch, {model['params'] / 1e6:.1f}M parameters (tied embedding once), {model['layers']} "
          f"layers, hidden {model['hidden']}, {model['heads']}/{model['kv_heads']} heads, vocab {model['vocab']:,}, "
          f"{model['dtype']}, random weights")
    print(f"generate: greedy, prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens per row, "
          f"best of {args.rounds} after 1 warm-up")
    print(f"{'side':<7}{'batch':>6}{'tokens':>9}{'seconds':>9}{'tokens/s':>11}{'vs HF':>8}  same as HF")
    for r in summary["generate"]:
        short = "" if r["tokens"] == r["expected_tokens"] else f" (of {r['expected_tokens']}: rows ended early)"
        line = f"{r['side']:<7}{r['batch']:>6}{r['tokens']:>9}{r['seconds']:>9.2f}{r['tokens_per_s']:>11,.0f}"
        if r["side"] == "huayu":
            same = "yes" if r["same_as_hf"] else (f"from token {r['first_difference']} "
                                                  f"({r['rows_same']}/{r['batch']} rows same)")
            line += f"{r['speed_vs_hf']:>7.2f}x  {same}"
        print(line + short)
    serve = summary["serve"]
    print(f"serve: huayu serve --max-batch-size {args.max_batch_size} --max-queue {args.max_queue}; one "
          f"/v1/completions request per client, greedy, max_tokens {args.serve_tokens}, ignore_eos")
    if "rows" not in serve:
        print(f"  not run: {serve.get('skipped') or serve.get('error')}")
    else:
        prompt_tokens = statistics.fmean(r["mean_prompt_tokens"] for r in serve["rows"])
        print(f"  prompts of {args.prompt_len} random characters: {prompt_tokens:.0f} tokens on average")
        print(f"{'clients':>7}{'tokens':>9}{'seconds':>9}{'tokens/s':>11}{'p50 s':>8}{'p95 s':>8}{'failures':>10}"
              f"{'largest batch':>15}")
        for r in serve["rows"]:
            print(f"{r['clients']:>7}{r['completion_tokens']:>9}{r['seconds']:>9.2f}{r['tokens_per_s']:>11,.0f}"
                  f"{fmt_seconds(r['p50_s']):>8}{fmt_seconds(r['p95_s']):>8}{r['failures']:>10}"
                  f"{r['largest_batch'] if r['largest_batch'] is not None else '-':>15}")
            if r["first_failure"]:
                print(f"  first failure: {r['first_failure']}")
        if serve["log_tail"]:
            print(f"  server log (last lines):\n{serve['log_tail']}")
    if args.smoke:
        print("--smoke checks the script: a tiny model on a shared CPU, so its rates and ratios mean nothing")
    print("=" * 92)


def failed(summary: dict) -> list[str]:
    """What went wrong in the run (differing greedy tokens are reported, not counted)."""
    problems = [f"generate {r['side']} batch {r['batch']}: {r['tokens']} of {r['expected_tokens']} tokens"
                for r in summary["generate"] if r["tokens"] != r["expected_tokens"]]
    serve = summary["serve"]
    if "error" in serve:
        problems.append(f"serve: {serve['error']}")
    for r in serve.get("rows", []):
        if r["failures"] or r["completion_tokens"] != r["expected_tokens"]:
            problems.append(f"serve {r['clients']} clients: {r['failures']} failures, {r['completion_tokens']} of "
                            f"{r['expected_tokens']} tokens")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print("gpu_inference_check: error: CUDA is not available (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}). Run it on a GPU machine, or pass --smoke for the CPU check of the script.",
              file=sys.stderr)
        return 2
    cuda = cuda and not args.smoke
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}" if cuda
              else f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__} [--smoke]")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="huayu-gpu-inference-check-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu_check = gpu_check_module()
    print(f"gpu_inference_check on {device}; working in {work}", flush=True)
    try:
        model_dir = work / "model"
        summary = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                   "smoke": args.smoke, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "keep")},
                   "model": build_checkpoint(args, gpu_check, model_dir)}
        print(f"  built in {time.perf_counter() - started:.0f} s: {summary['model']['params'] / 1e6:.1f}M-parameter "
              "Qwen2", flush=True)
        summary["generate"] = run_generate(args, gpu_check, model_dir, cuda)
        try:
            summary["serve"] = run_serve(args, gpu_check, model_dir, cuda, work)
        except RuntimeError as exc:
            summary["serve"] = {"error": str(exc)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = time.perf_counter() - started
    report(args, summary)
    print(f"total {summary['wall_s']:.0f} s")
    print(json.dumps(summary, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    problems = failed(summary)
    if problems:
        print(f"gpu_inference_check: error: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
