"""One-GPU check of huayu's training loop (issue 19): a ~0.4B Qwen2 at seq 2048, bf16, SDPA.

One command, no downloads (nothing is read from the Hub), a few minutes (under 8) on one H100/H200:

    PYTHONPATH=. python benchmarks/gpu_check.py              # needs CUDA; exits 2 without it
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke      # CPU, tiny model, fp32: checks the script (~1 min)

What it builds, in a temporary directory:
  tokenizer  a byte-level BPE trained by huayu (huayu.tokenizer.train_tokenizer, kind bpe) on random text
             over --chars CJK characters (about one token per character), with <|im_start|>/<|im_end|>
             and a ChatML chat template, as Qwen2's own tokenizer has
  model      Qwen2ForCausalLM from a config, random init, saved like a downloaded checkpoint (config.json,
             fp32 safetensors, tokenizer): hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
             tied embeddings (Qwen2-0.5B's body); vocab = the tokenizer's (~21k) rounded up to 64, so
             ~0.38B parameters (--model-vocab 151936: Qwen2-0.5B's 0.49B)
  data       single-turn dialogues (JSONL `messages`) of random Chinese text, long enough that every
             example is cut to exactly --seq-len tokens on both sides (no padding anywhere; the table's
             tokens/seq column shows it)

Then, each job in its own process (so its peak memory is its own):
  huayu full   huayu sft --finetuning-type full  --device cuda --bf16 --attn-implementation sdpa --torch-dtype float32
  HF full      transformers.Trainer, same model, batch, seq, steps, lr schedule, bf16 autocast, SDPA
  huayu lora   huayu sft --finetuning-type lora  (r 8, alpha 16, dropout 0.05, q/k/v/o projections)
  HF lora      transformers.Trainer on peft.get_peft_model with the same LoraConfig
Both sides keep fp32 weights and train under bf16 autocast (HF: TrainingArguments(bf16=True)).

tokens/s: the timed steps only (the first --warmup steps are not timed), tokens = attention_mask.sum().
  huayu: from out/log.jsonl (--log-every = --warmup, so the first row is the warm-up window);
  HF: a callback stamps the end of every step after torch.cuda.synchronize().
MFU = tokens/s x FLOPs per token / peak, where peak = the best rate of a bf16 8192^3 torch.matmul on this
  GPU, measured before and after the jobs (fp32 CPU matmul with --smoke: no GPU claim is made there).
  FLOPs per token: full 6N + 12*L*d*T; LoRA 4*N_frozen + 6*N_lora + 12*L*d*T (frozen weights need no
  weight gradient). N counts the tied embedding / LM head once, L layers, d hidden size, T = seq len; the
  attention term (scores and weighted sum, forward + backward) is the PaLM one, not halved for causality.
peak memory: torch.cuda.max_memory_allocated() of each job's process (--smoke: its peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target": ["q_proj", "k_proj", "v_proj", "o_proj"]}
JOBS = ("huayu-full", "hf-full", "huayu-lora", "hf-lora")
# (hidden, layers, heads, kv heads, intermediate): Qwen2-0.5B's body, and a tiny one for --smoke
SHAPES = {"gpu": (896, 24, 14, 2, 4864), "smoke": (64, 2, 4, 2, 128)}
GPU_DEFAULTS = dict(seq_len=2048, batch_size=8, warmup=5, steps=30, chars=20000, job_timeout=300)
SMOKE_DEFAULTS = dict(seq_len=128, batch_size=2, warmup=2, steps=3, chars=300, job_timeout=240)
MISSING_FLAGS_EXIT = 3


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every option's default."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: checks the script, not the GPU")
    p.add_argument("--seq-len", type=int, help=f"tokens per example (default {GPU_DEFAULTS['seq_len']}; "
                   f"--smoke {SMOKE_DEFAULTS['seq_len']})")
    p.add_argument("--batch-size", type=int, help=f"examples per step (default {GPU_DEFAULTS['batch_size']}; "
                   f"--smoke {SMOKE_DEFAULTS['batch_size']})")
    p.add_argument("--warmup", type=int, help=f"untimed first steps (default {GPU_DEFAULTS['warmup']})")
    p.add_argument("--steps", type=int, help=f"timed steps after the warm-up (default {GPU_DEFAULTS['steps']})")
    p.add_argument("--chars", type=int, help=f"distinct CJK characters in the data; the tokenizer has about "
                   f"1,000 tokens more (default {GPU_DEFAULTS['chars']}; --smoke {SMOKE_DEFAULTS['chars']})")
    p.add_argument("--model-vocab", type=int, default=0,
                   help="embedding rows of the model (0: the tokenizer's size rounded up to 64; 151936 gives "
                   "Qwen2-0.5B's 0.49B parameters and LM-head cost)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine, no warm-up), both sides")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (not counted in MFU)")
    p.add_argument("--hf-optim", default="adamw_torch_fused",
                   help="Trainer's optimizer (its default; huayu uses torch.optim.AdamW)")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--job-timeout", type=int, help="seconds per job before it counts as failed")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--keep", help="build in this directory and keep it, the jobs' outputs included "
                   "(default: a temporary directory, deleted)")
    p.add_argument("--verbose", action="store_true", help="show the jobs' own output")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        return args
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.seq_len, args.batch_size, args.warmup, args.steps) < 1 or args.seq_len % 2:
        p.error("--seq-len (even), --batch-size, --warmup and --steps must be positive")
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - set(JOBS):
        p.error(f"--jobs: choose from {', '.join(JOBS)}")
    return args


# -- what the jobs need -------------------------------------------------------------------------

def required_flags(args) -> list[str]:
    """The `huayu sft` flags this check passes (issue 19's training flags among them)."""
    flags = ["--device", "--attn-implementation", "--torch-dtype", "--lora-target", "--lora-dropout",
             "--max-seq-length", "--no-cache"]
    if not args.smoke:
        flags.append("--bf16")
    if args.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    return flags


def missing_huayu_flags(flags: list[str]) -> list[str]:
    """Those of `flags` that `huayu sft --help` does not list."""
    from huayu.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(["sft", "--help"])
        except SystemExit:
            pass
    text = out.getvalue()
    return [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


def cjk_pool(n: int) -> list[str]:
    """`n` distinct CJK characters from U+4E00 (CJK Unified Ideographs, then Extension A)."""
    codes = list(range(0x4E00, 0xA000)) + list(range(0x3400, 0x4DC0))
    if n > len(codes):
        raise SystemExit(f"--chars {n}: at most {len(codes)}")
    return [chr(c) for c in codes[:n]]


def random_text(rng: random.Random, pool: list[str], n: int) -> str:
    """`n` characters of random Chinese, with a punctuation mark every 8-20 characters."""
    out: list[str] = []
    while len(out) < n:
        out += rng.choices(pool, k=rng.randint(8, 20))
        out.append(rng.choice("，。？！"))
    return "".join(out[:n])


def build_tokenizer(pool: list[str], seq_len: int, seed: int):
    """A byte-level BPE (huayu.tokenizer.train_tokenizer, kind bpe) over random text of `pool`, about one
    token per character, with <|im_start|>/<|im_end|> and a ChatML template. Byte-level, as Qwen2's own
    is: transformers loads a directory whose config.json says qwen2 with its Qwen2Tokenizer, which keeps
    a byte-level BPE as it is but would garble a char-level vocabulary."""
    import string

    from huayu.tokenizer import train_tokenizer

    rng = random.Random(seed)
    texts = ["".join(pool), string.ascii_letters + string.digits + " \n"]
    texts += [random_text(rng, pool, 4000) for _ in range(max(10, len(pool) // 100))]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=len(pool) + 1024, model_max_length=seq_len)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def write_dialogues(path: Path, n: int, seq_len: int, pool: list[str], seed: int) -> None:
    """`n` single-turn dialogues whose user turn and reply are each far longer than seq_len / 2 tokens, so
    huayu's cut (source and target to seq_len / 2 each) and a plain truncation to seq_len both give
    exactly seq_len tokens."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": random_text(rng, pool, seq_len + 8)},
                    {"role": "assistant", "content": random_text(rng, pool, seq_len + 8)}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def build_model(shape, vocab: int, tok, seed: int):
    """A randomly initialised Qwen2ForCausalLM of `shape`; (model, config)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, inter = shape
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), config


def lora_parameters(model, r: int, targets: list[str]) -> int:
    """Parameters LoRA adds: r x (in + out) per adapted linear layer."""
    import torch

    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def matmul_peak(cuda: bool) -> tuple[float, str]:
    """(best FLOP/s, description): bf16 8192^3 on the GPU, fp32 n x n (n = 256, 512) on the CPU."""
    import torch

    if cuda:
        dtype, sizes, reps, rounds, label = torch.bfloat16, (8192,), 20, 8, "bf16 8192^3 torch.matmul, best of 8 x 20"
    else:
        dtype, sizes, reps, rounds, label = torch.float32, (256, 512), 10, 5, "fp32 256^3/512^3 CPU matmul, best"
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b, out=out)
        sync()
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=out)
            sync()
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t))
        del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    return best, label


# -- the jobs (each in its own process) ---------------------------------------------------------

def _peak_memory(cuda: bool) -> dict:
    if cuda:
        import torch

        return {"peak_mem": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
                "mem_kind": "max_memory_allocated"}
    return {"peak_mem": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "mem_kind": "peak RSS"}


def huayu_argv(spec: dict, method: str, out: Path) -> list[str]:
    seq = spec["seq_len"]
    argv = ["sft", "--model", spec["model"], "--data", spec["data"], "--out", str(out),
            "--finetuning-type", method, "--max-steps", str(spec["warmup"] + spec["steps"]),
            "--batch-size", str(spec["batch_size"]), "--grad-accum", "1", "--lr", str(spec["lr"]),
            "--max-source-length", str(seq // 2), "--max-target-length", str(seq // 2), "--max-seq-length", str(seq),
            "--log-every", str(spec["warmup"]), "--save-every", "0", "--seed", "42", "--no-cache",
            "--device", "cuda" if spec["cuda"] else "cpu", "--attn-implementation", "sdpa",
            "--torch-dtype", "float32"]
    if spec["bf16"]:
        argv.append("--bf16")
    if spec["gradient_checkpointing"]:
        argv.append("--gradient-checkpointing")
    if method == "lora":
        argv += ["--lora-rank", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
                 "--lora-dropout", str(LORA["dropout"]), "--lora-target", *LORA["target"]]
    return argv


def job_huayu(spec: dict, method: str, out: Path) -> dict:
    """`huayu sft` in this process; tokens/s over the log windows after the first (the warm-up)."""
    from huayu.cli import main

    argv = huayu_argv(spec, method, out)
    print("huayu " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"huayu sft exited with {rc}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "train_tokens_per_s" in r and "train_steps_per_s" in r]
    if len(rows) < 2 or rows[0]["step"] != spec["warmup"]:
        raise SystemExit(f"expected log rows every {spec['warmup']} steps in {out / 'log.jsonl'}, got steps "
                         f"{[r['step'] for r in rows]}")
    tokens = seconds = 0.0
    for prev, row in zip(rows, rows[1:]):
        window = (row["step"] - prev["step"]) / row["train_steps_per_s"]
        tokens, seconds = tokens + row["train_tokens_per_s"] * window, seconds + window
    steps = rows[-1]["step"] - rows[0]["step"]
    result = json.loads((out / "train_result.json").read_text(encoding="utf-8"))
    return {"tokens_per_s": tokens / seconds, "tokens_per_seq": tokens / (steps * spec["batch_size"]),
            "timed_steps": steps, "loss": rows[-1].get("train_loss", result.get("train_loss")), "wall_s": wall}


def job_hf(spec: dict, method: str, out: Path) -> dict:
    """A plain transformers.Trainer run: chat template -> tokenizer(truncation) -> causal-LM collator."""
    import inspect

    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    disable_progress_bars()
    cuda = spec["cuda"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    records = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if line]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    rows = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=spec["seq_len"], add_special_tokens=False),
        batched=True, remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules=LORA["target"]))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ends, real, losses = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync()
            ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            real.append(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)
            return loss

    total = spec["warmup"] + spec["steps"]
    checkpointing = {}
    if spec["gradient_checkpointing"]:  # `activation_checkpointing` since transformers 5.2x, the old name before
        name = "activation" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters \
            else "gradient"
        checkpointing = {f"{name}_checkpointing": True, f"{name}_checkpointing_kwargs": {"use_reentrant": False}}
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=total, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01,
        adam_beta2=0.95, max_grad_norm=1.0, optim=spec["hf_optim"], bf16=spec["bf16"], use_cpu=not cuda,
        seed=42, report_to="none", save_strategy="no", logging_steps=total, disable_tqdm=True,
        dataloader_num_workers=0, **checkpointing)
    trainer = CountingTrainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()],
                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w = spec["warmup"]
    if len(ends) != total:
        raise SystemExit(f"Trainer ran {len(ends)} steps, expected {total}")
    tokens = float(sum(int(x) for x in real[w:]))
    return {"tokens_per_s": tokens / (ends[-1] - ends[w - 1]),
            "tokens_per_seq": tokens / (spec["steps"] * spec["batch_size"]), "timed_steps": spec["steps"],
            "loss": float(losses[-1]), "wall_s": wall}


def run_job(args) -> None:
    """Internal entry point (--job NAME --spec FILE): one job; its result JSON next to the spec."""
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    side, method = args.job.split("-")
    out = Path(spec["work"]) / f"out-{args.job}"
    if spec["cuda"]:
        import torch

        torch.cuda.reset_peak_memory_stats()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    result = (job_huayu if side == "huayu" else job_hf)(spec, method, out)
    result.update(_peak_memory(spec["cuda"]))
    Path(spec["work"], f"result-{args.job}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not spec["keep"]:
        shutil.rmtree(out, ignore_errors=True)  # full-size checkpoints: GBs


# -- the driver ---------------------------------------------------------------------------------

def launch(job: str, spec_path: Path, work: Path, args) -> tuple[dict | None, str]:
    """Run `job` in a fresh process; (result or None, log tail on failure)."""
    log = work / f"{job}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HUAYU_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--spec", str(spec_path)]
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(cmd, env=env, stdout=None if args.verbose else f, stderr=subprocess.STDOUT
                                if not args.verbose else None, timeout=args.job_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.job_timeout} s"
    result_path = work / f"result-{job}.json"
    if rc == 0 and result_path.exists():
        print(f"  {job:<11} done in {time.perf_counter() - t0:5.1f} s", flush=True)
        return json.loads(result_path.read_text(encoding="utf-8")), ""
    tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]) if log.exists() else ""
    print(f"  {job:<11} FAILED ({rc}); last lines of its log:\n{tail}", flush=True)
    return None, tail


def flops_per_token(method: str, n_total: int, n_lora: int, layers: int, hidden: int, seq: int) -> float:
    attention = 12 * layers * hidden * seq
    return 6 * n_total + attention if method == "full" else 4 * n_total + 6 * n_lora + attention


def fmt_flops(f: float) -> str:
    return f"{f / 1e12:,.1f} TFLOP/s" if f >= 1e12 else f"{f / 1e9:,.1f} GFLOP/s"


def fmt_mem(b: float | None) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f} GiB"


def report(args, info: dict, results: dict, peak: float, peak_label: str) -> dict:
    """Print the summary table; return everything as one dict (for --json)."""
    hidden, layers = info["hidden"], info["layers"]
    mfu_head = "MFU(cpu)" if args.smoke else "MFU"
    rows = {}
    for job in args.jobs:
        r = results.get(job)
        method = job.split("-")[1]
        if r is not None:
            fpt = flops_per_token(method, info["params"], info["lora_params"], layers, hidden, args.seq_len)
            r = {**r, "flops_per_token": fpt, "mfu": r["tokens_per_s"] * fpt / peak}
        rows[job] = r
    print("\n" + "=" * 96)
    print(f"gpu_check summary: {info['device']}")
    print(f"model: Qwen2 arch, {info['params'] / 1e6:.1f}M parameters (tied embedding once), {layers} layers, "
          f"hidden {hidden}, {info['heads']}/{info['kv_heads']} heads, intermediate {info['inter']}, "
          f"vocab {info['vocab']:,}; LoRA r {LORA['r']} on {'/'.join(LORA['target'])}: "
          f"{info['lora_params'] / 1e6:.2f}M trainable")
    print(f"run: seq {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{'fp32' if args.smoke else 'bf16 autocast (fp32 weights)'}, SDPA"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; HF optim {args.hf_optim}")
    print("-" * 96)
    print(f"{'job':<12}{'tokens/s':>12}{mfu_head:>10}{'peak mem':>14}  {'(kind)':<22}{'tokens/seq':>11}{'loss':>9}")
    for job, r in rows.items():
        if r is None:
            print(f"{job:<12}{'FAILED':>12}")
            continue
        print(f"{job:<12}{r['tokens_per_s']:>12,.0f}{r['mfu']:>10.1%}{fmt_mem(r['peak_mem']):>14}  "
              f"{r['mem_kind']:<22}{r['tokens_per_seq']:>11.0f}{r['loss']:>9.4f}")
    ratios = {}
    for method in ("full", "lora"):
        h, f = rows.get(f"huayu-{method}"), rows.get(f"hf-{method}")
        if h and f:
            ratios[method] = {"tokens_per_s": h["tokens_per_s"] / f["tokens_per_s"],
                              "peak_mem": h["peak_mem"] / f["peak_mem"]}
            print(f"{'huayu/HF ' + method:<12}{ratios[method]['tokens_per_s']:>11.2f}x{'':>10}"
                  f"{ratios[method]['peak_mem']:>13.2f}x  (tokens/s, peak memory)")
    print("-" * 96)
    short = [j for j, r in rows.items() if r and round(r["tokens_per_seq"]) != args.seq_len]
    if short:
        print(f"note: {', '.join(short)} trained on sequences shorter than {args.seq_len} tokens (tokens/seq)")
    if args.smoke:
        print("--smoke checks the script: a few steps of a tiny model on a shared CPU, so its rates and ratios "
              "mean nothing")
    print(f"peak: {fmt_flops(peak)} ({peak_label}, measured in this run"
          f"{'; CPU: not a GPU figure' if args.smoke else ''})")
    print("MFU = tokens/s x FLOPs/token / peak; FLOPs/token: full 6N + 12*L*d*T, LoRA 4N + 6*N_lora + 12*L*d*T "
          f"(T = {args.seq_len}, attention not halved for causality)")
    print("=" * 96)
    return {"device": info["device"], "smoke": args.smoke, "model": info, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "bf16": not args.smoke,
            "gradient_checkpointing": args.gradient_checkpointing, "hf_optim": args.hf_optim,
            "peak_flops": peak, "peak_label": peak_label, "jobs": rows, "ratios": ratios}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        run_job(args)
        return 0
    t_start = time.perf_counter()
    # one GPU, the same one for the matmul peak and every job (with several visible, Trainer would
    # wrap the model in nn.DataParallel)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"
    import torch

    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print("gpu_check: error: CUDA is not available (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}). Run it on a GPU machine, or pass --smoke for the CPU check of the script.",
              file=sys.stderr)
        return 2
    cuda = cuda and not args.smoke
    sys.path.insert(0, str(REPO))
    missing = missing_huayu_flags(required_flags(args))
    if missing:
        print(f"gpu_check: error: `huayu sft` has no {', '.join(missing)} (issue 19's training flags); this "
              "huayu cannot run the check", file=sys.stderr)
        return MISSING_FLAGS_EXIT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}" if cuda
              else f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__} [--smoke]")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="huayu-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, cuda, device, work, t_start)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, cuda: bool, device: str, work: Path, t_start: float) -> int:
    shape = SHAPES["smoke" if args.smoke else "gpu"]
    print(f"gpu_check on {device}; working in {work}", flush=True)
    pool = cjk_pool(args.chars)
    tok = build_tokenizer(pool, args.seq_len, seed=0)
    vocab = args.model_vocab or -(-len(tok) // 64) * 64
    if vocab < len(tok):
        print(f"gpu_check: error: --model-vocab {vocab} is smaller than the tokenizer ({len(tok)})", file=sys.stderr)
        return 2
    model_dir, data = work / "model", work / "dialogues.jsonl"
    model, config = build_model(shape, vocab, tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"device": device, "params": n_params, "lora_params": lora_parameters(model, LORA["r"], LORA["target"]),
            "hidden": shape[0], "layers": shape[1], "heads": shape[2], "kv_heads": shape[3], "inter": shape[4],
            "vocab": vocab, "tokenizer_size": len(tok)}
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    write_dialogues(data, args.batch_size * (args.warmup + args.steps), args.seq_len, pool, seed=0)
    print(f"built in {time.perf_counter() - t_start:.0f} s: {n_params / 1e6:.1f}M-parameter Qwen2, tokenizer "
          f"{len(tok):,} tokens, {args.batch_size * (args.warmup + args.steps)} dialogues", flush=True)
    peak, peak_label = matmul_peak(cuda)
    spec = {"work": str(work), "model": str(model_dir), "data": str(data), "seq_len": args.seq_len,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "lr": args.lr,
            "cuda": cuda, "bf16": not args.smoke, "gradient_checkpointing": args.gradient_checkpointing,
            "hf_optim": args.hf_optim, "keep": bool(args.keep)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    print(f"matmul peak {fmt_flops(peak)}; jobs:", flush=True)
    results = {}
    for job in args.jobs:
        results[job] = launch(job, spec_path, work, args)[0]
    peak_after, _ = matmul_peak(cuda)
    summary = report(args, info, results, max(peak, peak_after), peak_label)
    summary["wall_s"] = time.perf_counter() - t_start
    print(f"total {summary['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    failed = [j for j, r in results.items() if r is None]
    if failed:
        print(f"gpu_check: error: {', '.join(failed)} failed (logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
