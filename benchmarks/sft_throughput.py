"""SFT throughput: `huayu sft` unpacked, `huayu sft --packing` and a padded HF Trainer (issue 21, item 4).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py             # the full matrix
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --smoke     # checks the script
    ... --threads 1      # on a machine other jobs share: 2 OpenMP threads on 2 busy cores crawl

For every dataset x model x cutoff, three sides train the same initial weights on the same examples
for one epoch, in one process, in rounds whose order alternates (A B C, C B A, ...); --rounds of them,
more (up to --max-rounds) while a side has under --min-timed timed seconds in all, so that the
tiny model's one-second runs are repeated enough to mean something. Rates are medians over rounds:

  huayu            huayu sft, unpacked: batches of 8 examples padded to their longest (pad_collate)
  huayu --packing  huayu sft --packing: examples packed into rows of `cutoff` tokens (best-fit
                   decreasing), 8 rows per step, no padding inside a row
  HF Trainer       transformers.Trainer + DataCollatorForSeq2Seq (pads each batch of 8 to its
                   longest, labels with -100): the baseline every SFT script starts from

Same everywhere: the char tokenizer (`huayu tokenizer train` on the data) and chat template, the
encoded examples (huayu's own encoding and loss mask: the Trainer's dataset is built from them, so
only padding/packing and the loop differ), the initial weights (saved once, loaded by every side),
bf16 autocast over fp32 weights, batch 8, lr, cosine schedule without warm-up, weight decay 0.01,
AdamW betas (0.9, 0.95), clipping at 1.0, seed. The Trainer keeps its default optimiser
(adamw_torch_fused).

Data. alpaca = the shared alpaca_zh_demo.json (read --format alpaca); smilechat = the first
--smile-dialogues dialogues of smilechat.jsonl.gz (read --role-map client=user,counselor=assistant
--skip-invalid). Both are read once by huayu's reader and written as JSONL `messages`, from which
every side reads. Per dataset and cutoff, a seeded shuffle of the dialogues gives --eval-examples
held-out dialogues, then the training subset: the next dialogues until they hold --tokens tokens and
fill at least --min-steps full batches of 8 both unpacked and packed (packed rows hold several
examples, so at cutoff 1024 this rule, not --tokens, sets the subset). Every side trains exactly one
epoch over that subset, so every side sees the same loss-bearing tokens; the packed side does it in
fewer, fuller steps (with the same lr schedule over its own step count).

Counting. loss tok/s = loss-bearing tokens (labels != -100 after the causal shift, i.e. the tokens
the loss averages over) of the timed steps / their wall time. The first --warmup steps of each run
are untimed. real tok/s counts all non-pad tokens (prompt included). fill = real tokens / computed
positions (rows x width). huayu's step times come from its log.jsonl (--log-every 1:
train_steps_per_s of each one-step window); its batches are replayed with huayu's own batch order
(huayu.train.loop._batches) to count their tokens, checked against the logged tokens per step. The
Trainer's steps are stamped by a callback; an overridden training_step counts its batches.

Loss. Every side sees the same tokens, so losses are compared at the end of the epoch: `train loss`
is the token-weighted mean of the per-step (per-token mean) training losses over the last quarter of
the epoch's loss-bearing tokens; `eval loss` is the per-token loss of the trained model on the
held-out examples (unpacked, padded batches, bf16 autocast, the same function for every side),
measured after each side's first round.

MFU = real tok/s x (6*N + 12*L*d*T) / peak: N = the parameters that take part in matmuls (all of
them, less the input embedding when it is not tied to the LM head), L layers, d hidden, T = the
token-weighted mean example length sum(len^2)/sum(len) (the context a token attends to; the PaLM
attention term, not halved for causality, and not counting the masked positions that packed rows
and padded rows also compute). Peak = the best bf16 n x n torch.matmul (n = 512/1024/2048,
benchmarks/pretrain_throughput.py), measured before every configuration and after the last.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import _HelpFormatter, matmul_peak, quiet  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
DATASETS = {"alpaca": SHARED / "instruct/alpaca_zh_demo.json", "smilechat": SHARED / "dialogue/smilechat.jsonl.gz"}
MODELS = ("small", "tiny-llama")
SIDES = ("huayu", "huayu --packing", "HF Trainer")
BATCH = 8
SMOKE = dict(datasets="alpaca", models="small", cutoffs="256", rounds=1, max_rounds=1, tokens=2000, min_steps=3,
             warmup=1, eval_examples=8, peak_seconds=0.2)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; `--help` shows this module's docstring and every option."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--datasets", default="alpaca,smilechat", help="comma-separated: alpaca, smilechat")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: small (the preset), tiny-llama (a LlamaConfig: hidden 128, 4 layers, "
                   "4 heads, 2 KV heads, intermediate 352, untied embeddings)")
    p.add_argument("--cutoffs", default="256,1024", help="comma-separated --max-seq-length values")
    p.add_argument("--rounds", type=int, default=2, help="rounds per configuration, side order alternating")
    p.add_argument("--min-timed", type=float, default=8.0, help="after --rounds, more rounds while a side has "
                   "fewer than this many timed seconds in all (short runs of the tiny model are noisy)")
    p.add_argument("--max-rounds", type=int, default=6, help="at most this many rounds per configuration")
    p.add_argument("--tokens", type=int, default=12000, help="at least this many tokens (prompt + reply) in each "
                   "training subset")
    p.add_argument("--min-steps", type=int, default=4, help="at least this many full steps of 8 for every side "
                   "(the subset grows until the packed rows fill them)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps of each run")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out examples for the eval loss")
    p.add_argument("--smile-dialogues", type=int, default=800, help="SmileChat dialogues read (from the start)")
    p.add_argument("--vocab-size", type=int, default=6000, help="char tokenizer size (at most)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, every side")
    p.add_argument("--packed-batch-size", type=int, default=BATCH,
                   help="rows per step of huayu --packing: below 8, a packed epoch takes about as many optimiser "
                        "steps as an unpacked one (for comparing losses at equal steps as well as equal tokens)")
    p.add_argument("--seed", type=int, default=42, help="weights, data order and subset seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per matmul size of the peak")
    p.add_argument("--smoke", action="store_true", help="alpaca, small, cutoff 256, one round of a few steps "
                   "(checks the script in well under a minute; its numbers mean nothing)")
    p.add_argument("--json", help="also write every run and the summary to this file")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, deleted)")
    p.add_argument("--verbose", action="store_true", help="show the trainers' own output")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.models = [m for m in args.models.split(",") if m]
    args.cutoffs = [int(c) for c in args.cutoffs.split(",") if c]
    if set(args.datasets) - set(DATASETS) or set(args.models) - set(MODELS) or not args.datasets \
            or not args.models or not args.cutoffs:
        p.error(f"--datasets from {', '.join(DATASETS)}, --models from {', '.join(MODELS)}, at least one of each")
    if min(args.rounds, args.warmup, args.min_steps, args.tokens, args.eval_examples) < 1:
        p.error("--rounds, --warmup, --min-steps, --tokens and --eval-examples must be at least 1")
    args.max_rounds = max(args.max_rounds, args.rounds)
    if args.min_steps <= args.warmup:
        p.error("--min-steps must be larger than --warmup")
    return args


# -- data, tokenizer, models (untimed) ---------------------------------------------------------

def read_dataset(name: str, args, tmp: Path) -> list[list[dict]]:
    """The dialogues of dataset `name` as huayu reads them with the flags the issue names."""
    from huayu.data.sources import DialogueDataArgs, read_dialogue_files

    notes: list[str] = []
    if name == "alpaca":
        dialogues = read_dialogue_files([str(DATASETS[name])], DialogueDataArgs(format="alpaca"), False,
                                        report=notes.append)
    else:
        raw = tmp / "smilechat-head.jsonl"
        with gzip.open(DATASETS[name], "rt", encoding="utf-8") as src:
            raw.write_text("".join(line for _, line in zip(range(args.smile_dialogues), src)), encoding="utf-8")
        data = DialogueDataArgs(role_map={"client": "user", "counselor": "assistant"})
        dialogues = read_dialogue_files([str(raw)], data, True, report=notes.append)
    return [d.messages for d in dialogues]


def write_dialogues(path: Path, dialogues: list[list[dict]]) -> str:
    with path.open("w", encoding="utf-8") as f:
        for messages in dialogues:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return str(path)


def train_tokenizer(files: list[str], args, tmp: Path):
    """`huayu tokenizer train` (char) on every dataset; returned with huayu's default chat template."""
    from huayu.cli import main
    from huayu.data.chat import ensure_chat_template
    from huayu.models.loading import load_tokenizer

    out = tmp / "tokenizer"
    with quiet(tmp / "tokenizer.log", args.verbose):
        if main(["tokenizer", "train", "--data", *files, "--vocab-size", str(args.vocab_size), "--out", str(out)]):
            raise SystemExit(f"huayu tokenizer train failed; see {tmp / 'tokenizer.log'}")
    tokenizer = load_tokenizer(str(out), None)
    ensure_chat_template(tokenizer)
    return tokenizer


def model_config(name: str, tokenizer):
    from transformers import LlamaConfig

    from huayu.models.presets import decoder_config

    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if name == "small":
        return decoder_config("small", len(tokenizer), special)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=False, **special)


def save_model(name: str, tokenizer, seed: int, directory: Path) -> dict:
    """The model's initial weights (fp32) and tokenizer, saved as a checkpoint every side loads;
    its size facts for the FLOPs count."""
    from transformers import AutoModelForCausalLM

    config = model_config(name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - (0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel())
    return {"dir": str(directory), "params": total, "matmul_params": matmul,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def sft_argv(model_dir: str, data: str, out: Path, cutoff: int, args, packed: bool) -> list[str]:
    """The `huayu sft` command line of a huayu side (also parsed for the Trainer side's examples)."""
    argv = ["sft", "--model", model_dir, "--data", data, "--out", str(out), "--device", "cpu", "--bf16",
            "--max-seq-length", str(cutoff), "--max-source-length", str(cutoff), "--max-target-length", str(cutoff),
            "--batch-size", str(args.packed_batch_size if packed else BATCH), "--epochs", "1", "--lr", str(args.lr),
            "--schedule", "cosine",
            "--warmup-steps", "0", "--weight-decay", "0.01", "--max-grad-norm", "1.0", "--seed", str(args.seed),
            "--log-every", "1", "--save-every", "0", "--cache-dir", str(args.cache_dir)]
    return argv + (["--packing"] if packed else [])


def encoded(model_dir: str, data: str, cutoff: int, args):
    """huayu's encoded examples of `data` (ArrowExamples), exactly as `huayu sft` builds them."""
    from huayu.cli import build_parser
    from huayu.config import config_from_args
    from huayu.models.loading import load_tokenizer
    from huayu.train.sft import SftConfig, build_examples

    cfg = config_from_args(SftConfig, build_parser("sft").parse_args(sft_argv(model_dir, data, Path("unused"),
                                                                              cutoff, args, False)[1:]))
    tokenizer = load_tokenizer(model_dir, None)
    with quiet(Path(args.cache_dir).parent / "encode.log", args.verbose):
        return build_examples(cfg, tokenizer)[0]


def loss_count(example) -> int:
    """Tokens the loss averages over: labels after the causal shift that are not -100."""
    import numpy as np

    return int((np.asarray(example.labels)[1:] != -100).sum())


def split_subset(lengths: list[int], cutoff: int, args) -> tuple[list[int], list[int]]:
    """(held-out indices, training indices): a seeded shuffle, its first --eval-examples held out,
    then examples until they hold --tokens tokens and give both an unpacked and a packed epoch at
    least --min-steps full batches of 8."""
    import random

    from huayu.data.packing import best_fit_rows

    order = list(range(len(lengths)))
    random.Random(args.seed).shuffle(order)
    held, rest = order[:args.eval_examples], order[args.eval_examples:]
    need, tokens = BATCH * args.min_steps, 0
    for k, i in enumerate(rest, 1):
        tokens += lengths[i]
        if tokens >= args.tokens and k >= need and \
                len(best_fit_rows([lengths[j] for j in rest[:k]], cutoff)) >= args.packed_batch_size * args.min_steps:
            return held, rest[:k]
    raise SystemExit(f"not enough examples for --tokens {args.tokens} and --min-steps {args.min_steps} at cutoff "
                     f"{cutoff} (--smile-dialogues reads more SmileChat)")


def prepare_config(dataset: str, dialogues, cutoff: int, model_dir: str, args, tmp: Path) -> dict:
    """The training and held-out files of (dataset, cutoff) and their examples' facts."""
    everything = write_dialogues(tmp / f"{dataset}.jsonl", dialogues)
    examples = encoded(model_dir, everything, cutoff, args)
    if len(examples) != len(dialogues):
        raise SystemExit(f"{dataset}: {len(dialogues)} dialogues gave {len(examples)} examples, expected one each")
    held, train = split_subset(examples.lengths(), cutoff, args)
    train_file = write_dialogues(tmp / f"{dataset}-{cutoff}-train.jsonl", [dialogues[i] for i in train])
    held_file = write_dialogues(tmp / f"{dataset}-{cutoff}-eval.jsonl", [dialogues[i] for i in held])
    train_examples = encoded(model_dir, train_file, cutoff, args)
    lengths = train_examples.lengths()
    held_out = list(encoded(model_dir, held_file, cutoff, args))
    return {"train_file": train_file, "train": train_examples, "eval": held_out, "lengths": lengths,
            "losses": [loss_count(e) for e in train_examples],
            "context": sum(n * n for n in lengths) / sum(lengths)}


# -- the three sides ---------------------------------------------------------------------------

def huayu_plan(data: dict, cutoff: int, packed: bool, seed: int, packed_batch: int = BATCH) -> list[dict]:
    """Per step of a huayu epoch: real tokens, computed positions and loss tokens, from huayu's own
    batch order (the loop's _batches) over its examples or packed rows."""
    from huayu.data.packing import best_fit_rows
    from huayu.train.loop import TrainArgs, _batches, total_steps

    lengths, losses = data["lengths"], data["losses"]
    if packed:
        rows = best_fit_rows(lengths, cutoff)
        lengths, losses = [sum(lengths[i] for i in r) for r in rows], [sum(losses[i] for i in r) for r in rows]
    targs = TrainArgs(batch_size=packed_batch if packed else BATCH, seed=seed, epochs=1.0)
    batches = _batches(len(lengths), targs, 0)
    plan = []
    for _ in range(total_steps(len(lengths), targs)):
        idx = [int(i) for i in next(batches)[1]]
        plan.append({"real": sum(lengths[i] for i in idx), "computed": len(idx) * max(lengths[i] for i in idx),
                     "loss_tokens": sum(losses[i] for i in idx)})
    return plan


def run_huayu(cfg: dict, packed: bool, out: Path, args) -> dict:
    """`huayu sft [--packing]` in this process; its steps from log.jsonl, their tokens from the plan."""
    from huayu.cli import main

    argv = sft_argv(cfg["model"]["dir"], cfg["data"]["train_file"], out, cfg["cutoff"], args, packed)
    with quiet(out.with_suffix(".log"), args.verbose):
        if main(argv):
            raise SystemExit(f"huayu sft failed; see {out.with_suffix('.log')}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "train_steps_per_s" in r]
    plan = huayu_plan(cfg["data"], cfg["cutoff"], packed, args.seed, args.packed_batch_size)
    if [r["step"] for r in rows] != list(range(1, len(plan) + 1)):
        raise SystemExit(f"{out / 'log.jsonl'}: expected one row per step for {len(plan)} steps")
    for row, step in zip(rows, plan):
        logged = row["train_tokens_per_s"] / row["train_steps_per_s"]
        if abs(logged - step["real"]) > 0.5 + 1e-6 * step["real"]:
            raise SystemExit(f"step {row['step']}: huayu logged {logged:.1f} tokens, the replayed batch has "
                             f"{step['real']}: huayu's batch order changed, update huayu_plan")
    steps = [{**step, "seconds": 1 / row["train_steps_per_s"], "loss": row["train_loss"]}
             for row, step in zip(rows, plan)]
    return {"steps": steps, "model": lambda: _load(out)}


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out))


def run_trainer(cfg: dict, out: Path, args) -> dict:
    """A plain transformers.Trainer with DataCollatorForSeq2Seq on huayu's encoded examples."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["dir"])
    dataset = cfg["data"]["train"].dataset.with_format(None).select_columns(["input_ids", "labels"])
    ends, steps = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            mask = inputs["attention_mask"]
            steps.append({"real": int(mask.sum()), "computed": mask.numel(),
                          "loss_tokens": int((inputs["labels"][:, 1:] != -100).sum()), "loss": float(loss)})
            return loss

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01, adam_beta2=0.95, max_grad_norm=1.0,
        bf16=True, use_cpu=True, seed=args.seed, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["dir"])
    trainer = CountingTrainer(model=model, args=targs, train_dataset=dataset, callbacks=[Clock()],
                              data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with quiet(out.with_suffix(".log"), args.verbose):
        trainer.train()
    if len(ends) != len(steps):
        raise SystemExit(f"Trainer: {len(ends)} step ends for {len(steps)} steps")
    for k in range(1, len(steps)):
        steps[k]["seconds"] = ends[k] - ends[k - 1]
    steps[0]["seconds"] = float("nan")  # never timed (--warmup >= 1)
    return {"steps": steps, "model": lambda: trainer.model}


def eval_loss(model, examples: list, pad_id: int) -> float:
    """Per-token loss on the held-out examples: unpacked, padded batches (shortest first), bf16
    autocast, huayu's evaluate_loss, the same for every side."""
    from huayu.data.batching import pad_collate
    from huayu.train.loop import evaluate_loss

    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return evaluate_loss(model, ordered, pad_collate(pad_id), BATCH,
                         autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


# -- summaries ---------------------------------------------------------------------------------

def timed(steps: list[dict], warmup: int) -> dict:
    """Rates over the steps after the first `warmup`, and the run's token shares."""
    t = steps[warmup:]
    seconds = sum(s["seconds"] for s in t)
    return {"loss_tok_s": sum(s["loss_tokens"] for s in t) / seconds, "real_tok_s": sum(s["real"] for s in t) / seconds,
            "fill": sum(s["real"] for s in steps) / sum(s["computed"] for s in steps), "timed_steps": len(t),
            "timed_seconds": seconds}


def tail_loss(steps: list[dict], fraction: float = 0.25) -> float:
    """Token-weighted mean of the per-step losses over the last `fraction` of the loss tokens
    (a step straddling the boundary counts with its tokens past it)."""
    total = sum(s["loss_tokens"] for s in steps)
    start, seen, num, den = (1 - fraction) * total, 0, 0.0, 0.0
    for s in steps:
        past = max(0.0, seen + s["loss_tokens"] - max(start, seen))
        num, den, seen = num + s["loss"] * past, den + past, seen + s["loss_tokens"]
    return num / den if den else float("nan")


def flops_per_token(model: dict, context: float) -> float:
    return 6 * model["matmul_params"] + 12 * model["layers"] * model["hidden"] * context


def summarise(cfg: dict, runs: dict, peak: float) -> dict:
    """Per side: median (min, max) over rounds of the rates, MFU at the median, losses."""
    flops = flops_per_token(cfg["model"], cfg["data"]["context"])
    sides = {}
    for side, rs in runs.items():
        loss_rates = [r["loss_tok_s"] for r in rs]
        real_rate = statistics.median(r["real_tok_s"] for r in rs)
        sides[side] = {"loss_tok_s": statistics.median(loss_rates), "min": min(loss_rates), "max": max(loss_rates),
                       "real_tok_s": real_rate, "mfu": real_rate * flops / peak, "fill": rs[0]["fill"],
                       "steps": rs[0]["n_steps"], "tail_loss": statistics.mean(r["tail_loss"] for r in rs),
                       "eval_loss": rs[0]["eval_loss"]}
    base = sides["HF Trainer"]["loss_tok_s"]
    return {"sides": sides, "flops_per_token": flops, "rounds": len(runs["HF Trainer"]),
            "ratios": {"packed/Trainer": sides["huayu --packing"]["loss_tok_s"] / base,
                       "unpacked/Trainer": sides["huayu"]["loss_tok_s"] / base}}


def describe(cfg: dict) -> str:
    d, m = cfg["data"], cfg["model"]
    return (f"{cfg['dataset']}, {cfg['model_name']} ({m['params'] / 1e6:.2f}M), cutoff {cfg['cutoff']}: "
            f"{len(d['lengths'])} training examples, {sum(d['lengths']):,} tokens ({sum(d['losses']):,} "
            f"loss-bearing), mean length {statistics.mean(d['lengths']):.0f}, {len(d['eval'])} held out")


def print_config_table(cfg: dict, summary: dict) -> None:
    print(f"\n{describe(cfg)}; FLOPs/token {summary['flops_per_token'] / 1e6:.1f}M; "
          f"{summary['rounds']} round{'s' if summary['rounds'] > 1 else ''}")
    print(f"  {'side':<16}{'steps':>6}{'fill':>8}{'loss tok/s':>12}{'(min-max)':>16}{'real tok/s':>12}{'MFU':>7}"
          f"{'train loss':>12}{'eval loss':>11}")
    for side, s in summary["sides"].items():
        spread = f"{s['min']:,.0f}-{s['max']:,.0f}"
        print(f"  {side:<16}{s['steps']:>6}{s['fill']:>8.1%}{s['loss_tok_s']:>12,.0f}{spread:>16}"
              f"{s['real_tok_s']:>12,.0f}{s['mfu']:>7.1%}{s['tail_loss']:>12.3f}{s['eval_loss']:>11.3f}")
    r = summary["ratios"]
    fills = {k: v["fill"] for k, v in summary["sides"].items()}
    print(f"  packed/Trainer {r['packed/Trainer']:.2f}x, unpacked/Trainer {r['unpacked/Trainer']:.2f}x "
          f"(median loss tok/s; the fill ratio packed/Trainer, what packing saves at equal cost per computed "
          f"position, is {fills['huayu --packing'] / fills['HF Trainer']:.2f}x)", flush=True)


def print_summary(results: list[dict], peak: float, args) -> None:
    print(f"\nsummary (median over each configuration's rounds; loss tok/s; losses: Trainer / unpacked / packed; "
          f"matmul peak {peak / 1e9:,.1f} GFLOP/s bf16, {torch.get_num_threads()} threads)")
    print(f"{'dataset':<11}{'model':<12}{'cutoff':>6}{'Trainer':>9}{'huayu':>8}{'packed':>8}{'packed/T':>10}"
          f"{'unpacked/T':>12}{'train loss T/U/P':>22}{'eval loss T/U/P':>22}")
    for res in results:
        s, r = res["summary"]["sides"], res["summary"]["ratios"]
        order = ("HF Trainer", "huayu", "huayu --packing")
        train = "/".join(f"{s[k]['tail_loss']:.2f}" for k in order)
        held = "/".join(f"{s[k]['eval_loss']:.2f}" for k in order)
        print(f"{res['dataset']:<11}{res['model']:<12}{res['cutoff']:>6}{s['HF Trainer']['loss_tok_s']:>9,.0f}"
              f"{s['huayu']['loss_tok_s']:>8,.0f}{s['huayu --packing']['loss_tok_s']:>8,.0f}"
              f"{r['packed/Trainer']:>9.2f}x{r['unpacked/Trainer']:>11.2f}x{train:>22}{held:>22}")


# -- the driver --------------------------------------------------------------------------------

def run_config(cfg: dict, args, work: Path) -> tuple[dict, float]:
    """Every side, --rounds times, order alternating, and more rounds (up to --max-rounds) while a
    side has fewer than --min-timed seconds of timed steps; ({side: [run facts]}, matmul peak before)."""
    peak = matmul_peak(torch.bfloat16, args.peak_seconds)
    runs = {side: [] for side in SIDES}
    tag = f"{cfg['dataset']}-{cfg['model_name']}-{cfg['cutoff']}"

    def more(r: int) -> bool:
        short = min(sum(f["timed_seconds"] for f in runs[side]) for side in SIDES) < args.min_timed
        return r < args.rounds or (r < args.max_rounds and short)

    r = 0
    while more(r):
        for side in SIDES[::-1] if r % 2 else SIDES:
            out = work / f"{tag}-{side.replace(' --', '-').replace(' ', '-')}-{r}"
            shutil.rmtree(out, ignore_errors=True)  # a --keep directory's earlier run
            t0 = time.perf_counter()
            run = run_trainer(cfg, out, args) if side == "HF Trainer" else \
                run_huayu(cfg, side.endswith("packing"), out, args)
            wall = time.perf_counter() - t0
            facts = {**timed(run["steps"], args.warmup), "n_steps": len(run["steps"]), "wall_s": wall,
                     "tail_loss": tail_loss(run["steps"]), "eval_loss": float("nan"),
                     "curve": [[s["loss_tokens"], s["loss"]] for s in run["steps"]]}
            if r == 0:
                facts["eval_loss"] = eval_loss(run["model"](), cfg["data"]["eval"], cfg["pad_id"])
            runs[side].append(facts)
            print(f"{tag} round {r + 1}: {side:<16}{facts['loss_tok_s']:>7,.0f} loss tok/s "
                  f"({facts['real_tok_s']:,.0f} real, fill {facts['fill']:.1%}), {facts['n_steps']} steps, "
                  f"train loss {facts['tail_loss']:.3f}, run {wall:.0f} s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        r += 1
    return runs, peak


def main(argv=None) -> dict:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # its handler writes to the real stderr, past quiet()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="huayu-sft-bench-") as name:
        work = Path(args.keep) if args.keep else Path(name)
        work.mkdir(parents=True, exist_ok=True)
        args.cache_dir = str(work / "cache")
        dialogues = {d: read_dataset(d, args, work) for d in args.datasets}
        files = [write_dialogues(work / f"{d}-all.jsonl", dialogues[d]) for d in args.datasets]
        tokenizer = train_tokenizer(files, args, work)
        models = {m: save_model(m, tokenizer, args.seed, work / f"model-{m}") for m in args.models}
        sizes = ", ".join(f"{m} {v['params'] / 1e6:.2f}M" for m, v in models.items())
        print(f"datasets: {', '.join(f'{d} {len(v)} dialogues' for d, v in dialogues.items())}; vocab "
              f"{len(tokenizer)}; models: {sizes}; "
              f"batch {BATCH} (packed rows: {args.packed_batch_size}), bf16 autocast, lr {args.lr}, "
              f"{args.rounds} round(s), {args.warmup} untimed step(s)",
              flush=True)
        results, peaks = [], []
        for dataset in args.datasets:
            for cutoff in args.cutoffs:
                data = prepare_config(dataset, dialogues[dataset], cutoff, models[args.models[0]]["dir"], args, work)
                for m in args.models:
                    cfg = {"dataset": dataset, "model_name": m, "model": models[m], "cutoff": cutoff, "data": data,
                           "pad_id": tokenizer.pad_token_id}
                    print(describe(cfg), flush=True)
                    runs, peak = run_config(cfg, args, work)
                    peaks.append(peak)
                    results.append({"dataset": dataset, "model": m, "cutoff": cutoff, "runs": runs, "cfg": cfg})
        peak = max(peaks + [matmul_peak(torch.bfloat16, args.peak_seconds)])
        for res in results:
            res["summary"] = summarise(res["cfg"], res["runs"], peak)
            print_config_table(res["cfg"], res["summary"])
        print_summary(results, peak, args)
        elapsed = time.perf_counter() - start
        print(f"\ntotal {elapsed / 60:.1f} min")
        report = {"args": {k: v for k, v in vars(args).items() if k != "cache_dir"}, "peak_flops": peak,
                  "threads": torch.get_num_threads(), "elapsed_s": elapsed,
                  "results": [{"dataset": r["dataset"], "model": r["model"], "cutoff": r["cutoff"],
                               "examples": len(r["cfg"]["data"]["lengths"]), "tokens": sum(r["cfg"]["data"]["lengths"]),
                               "loss_tokens": sum(r["cfg"]["data"]["losses"]), "params": r["cfg"]["model"]["params"],
                               "summary": r["summary"], "runs": r["runs"]} for r in results]}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
        return report


if __name__ == "__main__":
    main()
