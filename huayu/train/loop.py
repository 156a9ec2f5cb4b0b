"""The one training loop every stage and family uses.

A stage supplies the model, a list of examples, a collate function and the resolved config; the loop
owns the optimiser, schedule, logging, checkpoints and exact resume. The data order of epoch e is a
permutation seeded by (seed, e), so a run resumed at optimiser step k sees exactly the batches an
uninterrupted run would have seen from step k on.

The loop runs through accelerate (huayu/train/distributed.py): on the CPU or a CUDA GPU, in fp32,
bf16 or fp16, and under torchrun / accelerate launch data-parallel: `batch_size` is per process,
each global micro-batch of batch_size x world size examples of that order is shared out between the
ranks, and only rank 0 writes files. One process with batch_size x world size per micro-batch sees
the same examples at every step.

A step's loss is token-weighted: every micro-batch of every rank counts by the tokens (or examples)
its loss averages over, so --grad-accum 4 --batch-size 2 trains on the loss of --batch-size 8 even
when the batches' lengths differ (transformers' Trainer does the same with num_items_in_batch).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from huayu.config import field_doc, save_config
from huayu.data.batching import batch_counts, example_lengths, to_device
from huayu.data.templates import write_template_record
from huayu.errors import HuayuError
from huayu.models.families import family_of
from huayu.train import distributed, parallel
from huayu.train.schedules import SCHEDULES, lr_multiplier
from huayu.train.state import LEGACY_PICKLE, has_state, load_state, save_state

CHECKPOINTS = "checkpoints"


@dataclass
class TrainArgs:
    epochs: float = field_doc("passes over the training data (fractions allowed)", default=1.0)
    max_steps: int = field_doc("stop after this many optimiser steps (0: from epochs)", default=0)
    batch_size: int = field_doc("examples per micro-batch of each process (torchrun: x processes)", default=8)
    grad_accum: int = field_doc("micro-batches per optimiser step", default=1)
    lr: float = field_doc("peak learning rate", default=3e-4)
    min_lr: float = field_doc("learning rate at the end of cosine/linear decay", default=0.0)
    schedule: str = field_doc(f"learning-rate schedule: {'|'.join(SCHEDULES)}", default="cosine")
    warmup_steps: int = field_doc("linear warm-up steps", default=0)
    weight_decay: float = field_doc("AdamW weight decay", default=0.01)
    max_grad_norm: float = field_doc("gradient clipping norm (0: off)", default=1.0)
    seed: int = field_doc("seed for initialisation, data order and dropout", default=42)
    device: str = field_doc("auto | cpu | cuda (auto: a CUDA GPU when there is one)", default="auto")
    bf16: bool = field_doc("bf16 mixed precision (GPUs since Ampere; CPUs with AVX-512 bf16)", default=False)
    fp16: bool = field_doc("fp16 mixed precision with loss scaling (V100, T4; GPUs only)", default=False)
    gradient_checkpointing: bool = field_doc("recompute activations in the backward pass: far less memory for "
                                             "long sequences, about a third more compute", default=False)
    fsdp: bool = field_doc("shard parameters, gradients and optimiser state over the processes (FSDP2, one unit "
                           "per decoder layer); on by itself under an accelerate FSDP config", default=False)
    deepspeed: str | None = field_doc("a DeepSpeed config (JSON, e.g. examples/deepspeed/zero3.json): shard with "
                                      "ZeRO-2/3 under torchrun; accelerate launch with a DeepSpeed config does the "
                                      "same",
                                      default=None)
    pure_bf16: bool = field_doc("train a bf16/fp16 model's weights in that precision (no fp32 master weights: "
                                "half the memory, less exact updates)", default=False)
    group_by_length: bool = field_doc("batch examples of similar length together (less padding; the order stays "
                                      "random and reproducible)", default=False)
    log_every: int = field_doc("optimiser steps between log lines", default=10)
    eval_every: int = field_doc("optimiser steps between validation runs (0: at the end)", default=0)
    save_every: int = field_doc("optimiser steps between checkpoints (0: at the end only)", default=0)
    save_total_limit: int = field_doc("how many step-N checkpoints to keep", default=2)
    resume: bool = field_doc("continue from the last checkpoint in the output directory", default=False)


@dataclass
class Evaluation:
    """A stage's own validation: `run(model)` returns its metrics (e.g. loss and accuracy); with
    `best`, the checkpoint with the highest value of that metric is kept in `out/best` and becomes
    the final model (transformers' load_best_model_at_end)."""
    run: Callable[[object], dict[str, float]]
    best: str | None = None


LossFn = Callable[[object, dict], tuple["torch.Tensor", dict[str, float]]]  # (model, batch) -> (loss, parts)
BEST = "best"


def model_loss(model, batch: dict):
    """The model's own loss, as every transformers model computes it from `labels`."""
    return model(**batch).loss, {}


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete `out/checkpoints/step-N` directory, or None."""
    root = Path(out) / CHECKPOINTS
    steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []
    steps = [p for p in steps if has_state(p) or (p / LEGACY_PICKLE).exists()]  # a legacy one: refused on loading
    return steps[-1] if steps else None


def _batches(n_examples: int, args: TrainArgs, start_micro: int, lengths: list[int] | None = None):
    """Yield (micro-batch index, this rank's example indices) from `start_micro` on, forever. A
    global micro-batch is the next batch_size x world size examples of the epoch's order; an
    epoch's last one may be shorter and is topped up from the order's start if some rank would
    get nothing (every rank must take part in every step). With `lengths` (--group-by-length) the
    order puts examples of similar length together (_grouped_by_length)."""
    world = distributed.world_size()
    size = args.batch_size * world
    per_epoch = math.ceil(n_examples / size)
    micro = start_micro
    while True:
        epoch, i = divmod(micro, per_epoch)
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(n_examples, generator=gen)
        if lengths is not None:
            order = _grouped_by_length(order, lengths, size, gen)
        for j in range(i, per_epoch):
            chunk = order[j * size:(j + 1) * size]
            if len(chunk) < world:
                chunk = torch.cat([chunk, order[:world - len(chunk)]])
            yield micro, distributed.shard(chunk)
            micro += 1


def _grouped_by_length(order: torch.Tensor, lengths: list[int], size: int, gen: torch.Generator) -> torch.Tensor:
    """The epoch's random `order`, cut into mega-batches of 50 micro-batches, each sorted by length
    (longest first) and cut into micro-batches, whose order is then shuffled: batches of similar
    lengths pad little, and stay random (transformers' LengthGroupedSampler does the same). Drawn
    from the epoch's generator, so a resumed run sees the same batches."""
    mega = size * 50
    groups = []
    for start in range(0, len(order), mega):
        chunk = order[start:start + mega].tolist()
        chunk.sort(key=lambda i: -lengths[i])
        groups += [chunk[k:k + size] for k in range(0, len(chunk), size)]
    tail = groups.pop() if len(groups) > 1 and len(groups[-1]) < size else None  # a short one stays last
    shuffled = [groups[k] for k in torch.randperm(len(groups), generator=gen).tolist()]
    return torch.tensor([i for group in shuffled + ([tail] if tail else []) for i in group], dtype=torch.long)


def total_steps(n_examples: int, args: TrainArgs) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = math.ceil(n_examples / (args.batch_size * distributed.world_size()))
    return max(1, math.ceil(args.epochs * per_epoch / args.grad_accum))


@torch.no_grad()
def evaluate_loss(model, examples, collate, batch_size: int = 8, autocast=nullcontext) -> float:
    """Token-weighted mean loss of `model` over `examples`."""
    items = family_of(model.config).loss_items
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        n = items(batch)
        if n == 0:  # e.g. a 1-token tail block: nothing to predict, and the model's mean would be NaN
            continue
        with torch.no_grad(), autocast():  # no graph: on a GPU it would hold every activation
            loss = model(**to_device(batch, model.device)).loss.float().item()
        total, count = total + loss * n, count + n
    model.train()
    return total / max(count, 1)


class _Log:
    """TensorBoard scalars plus an append-only `log.jsonl` the loss curve is drawn from."""

    def __init__(self, out: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "log.jsonl"
        rows = self.rows() if resume_step else []
        kept = [r for r in rows if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.tb = SummaryWriter(str(out / "runs"), purge_step=resume_step + 1 if resume_step else None)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def write(self, step: int, **values) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(key.replace("_", "/", 1), value, step)

    def plot(self, png: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("train_loss", "train"), ("eval_loss", "validation")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "eval_loss" else None)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


class _Window:
    """What happened since the last log line: losses (and their parts), steps, sequences, tokens."""

    def __init__(self):
        self.t0, self.steps, self.seqs, self.tokens = time.perf_counter(), 0, 0, 0
        self.sums: dict[str, float] = {}

    def add_step(self, losses: dict[str, float], seqs: int, tokens: int) -> None:
        """One optimiser step: its loss and loss parts (means over its batch), its sequences and tokens."""
        self.steps, self.seqs, self.tokens = self.steps + 1, self.seqs + seqs, self.tokens + tokens
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"steps_per_s": self.steps / elapsed, "seqs_per_s": self.seqs / elapsed,
                "tokens_per_s": self.tokens / elapsed}

    def summary(self) -> dict[str, float]:
        return {**{k: v / max(self.steps, 1) for k, v in self.sums.items()}, **self.rates()}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _save_weights(directory: Path, model, tokenizer, chat_trained: bool, weights: dict | None = None) -> None:
    """Model (or adapter) and tokenizer; for chat training also the record of its template.
    `weights`: the model's state gathered from its shards (FSDP), else the model's own."""
    model.save_pretrained(directory, state_dict=weights)
    tokenizer.save_pretrained(directory)
    if chat_trained:
        write_template_record(directory, tokenizer)


def _save_checkpoint(out: Path, step: int, layout, tokenizer, scheduler, cfg, keep: int, chat_trained: bool,
                     rng_by_rank: list[dict]):
    """Write `out/checkpoints/step-N` atomically: build it under a temp name, then rename. Every
    rank calls this and writes its part of the state (huayu/train/parallel.py); rank 0 writes the
    rest: the model (or adapter, which resuming puts back on the run's base model) where the
    layout keeps it whole, the tokenizer, the config and the trainer state, whose JSON comes last.
    `rng_by_rank`: every process's random state, so each one's dropout and masking resume exactly."""
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    state = layout.save(tmp)
    distributed.barrier()
    if distributed.is_main():
        if layout.weights_in_checkpoint:
            _save_weights(tmp, layout.model, tokenizer, chat_trained)
        else:
            tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
        save_state(tmp, {"step": step, **state, "scheduler": scheduler.state_dict(), "rng_by_rank": rng_by_rank,
                         "layout": layout.record()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep or None]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _replace_files(source: Path, out: Path) -> None:
    """Copy the files of `source` into `out`, each moved into place atomically."""
    for f in source.iterdir():
        if f.is_file():
            tmp = out / f".tmp-{f.name}"
            shutil.copy(f, tmp)
            os.replace(tmp, out / f.name)


def _save_final(out: Path, model, tokenizer, chat_trained: bool, weights: dict | None) -> None:
    """Save the final model into `out/`, each file moved into place atomically. A peft model
    saves its adapter (adapter_config.json + adapter_model.safetensors), which with the tokenizer
    beside it loads with `PeftModel.from_pretrained(base, out)` or `huayu chat out`."""
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_weights(tmp, model, tokenizer, chat_trained, weights)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _save_best(out: Path, model, tokenizer, metrics: dict, chat_trained: bool, weights: dict | None) -> None:
    tmp, final = out / f".tmp-{BEST}", out / BEST
    shutil.rmtree(tmp, ignore_errors=True)
    _save_weights(tmp, model, tokenizer, chat_trained, weights)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _best_so_far(out: Path, key: str) -> float:
    path = out / BEST / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8"))[key] if path.exists() else -math.inf


def _make_optimizer(model, args: TrainArgs):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def _restore_rng(state: dict, seed: int, start: int) -> None:
    """This rank's random state from a checkpoint (`rng`: one written before runs had ranks). A
    checkpoint of another number of processes has no state for this rank: the streams start anew."""
    states = state.get("rng_by_rank") or [state["rng"]]
    if len(states) != distributed.world_size():
        print(f"note: the checkpoint was written by {len(states)} process(es), this run has "
              f"{distributed.world_size()}: dropout and masking continue from fresh random streams")
        torch.manual_seed(seed + 1_000_003 * start + distributed.rank())
        random.seed(seed + 1_000_003 * start + distributed.rank())
        return
    mine = states[distributed.rank()]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])


def fit(model, tokenizer, examples: list, collate, args: TrainArgs, out: str | Path, cfg,
        eval_examples: list | None = None, resume_from: Path | None = None, chat_trained: bool = False,
        loss_fn: LossFn = model_loss, evaluation: Evaluation | None = None) -> dict:
    """Train `model` on `examples`; return the final metrics (train_loss, eval_loss, steps, ...).
    `chat_trained`: the examples were rendered with the tokenizer's chat template (recorded).
    `loss_fn` computes a batch's loss and any parts of it worth logging (MLM and SOP losses);
    `evaluation` replaces the validation loss on `eval_examples` with the stage's own metrics.
    Under torchrun (inside `distributed.session()`) every rank calls this: rank 0 validates and
    writes, and every rank returns the same metrics."""
    from tqdm.auto import tqdm

    out, main = Path(out), distributed.is_main()
    if len(examples) < distributed.world_size():
        raise HuayuError(f"{len(examples)} training example(s) cannot be shared between "
                         f"{distributed.world_size()} processes")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    steps = total_steps(len(examples), args)
    accelerator = distributed.accelerator(args.device, args.bf16, args.fp16)
    layout = parallel.layout(accelerator, args)
    wrapped, optimizer = layout.prepare(model, loss_fn, lambda m: _make_optimizer(m, args))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(args.schedule, s, steps, args.warmup_steps, args.min_lr / args.lr))
    start = 0
    torch.manual_seed(args.seed + distributed.rank())  # ranks differ in dropout and masking, not in weights
    random.seed(args.seed + distributed.rank())
    if resume_from is not None:
        state = load_state(resume_from)
        layout.check_resumable(parallel.checkpoint_layout(resume_from), resume_from)
        layout.load(resume_from, state)
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        _restore_rng(state, args.seed, start)
        print(f"resuming from {resume_from} (step {start} of {steps})")
        if start >= steps and (out / "train_result.json").exists():
            print("that run had already finished")
            return json.loads((out / "train_result.json").read_text(encoding="utf-8"))
    log = _Log(out, start) if main else None
    model.train()
    items = family_of(model.config).loss_items

    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 10, disable=not main)
    batches = _batches(len(examples), args, start * args.grad_accum,
                       example_lengths(examples) if args.group_by_length else None)
    validates = evaluation is not None or bool(eval_examples is not None and len(eval_examples))
    window = _Window()
    last_loss, eval_metrics = float("nan"), None
    for step in range(start + 1, steps + 1):
        micro = [collate([examples[i] for i in next(batches)[1]]) for _ in range(args.grad_accum)]
        counts = [items(batch) for batch in micro]
        # the step's loss averages over every item of every micro-batch of every rank
        _, total = distributed.reduce({}, {"items": sum(counts)})
        parts_sum, loss_sum = {}, 0.0  # this rank's: parts as means over its micro-batches
        for k, (batch, count) in enumerate(zip(micro, counts)):
            weight = count / max(total["items"], 1)
            with layout.accumulating(last=k == len(micro) - 1):
                with accelerator.autocast():
                    loss, parts = wrapped(to_device(batch, accelerator.device))
                # DDP averages gradients over the ranks, so each rank's share is scaled back up
                layout.backward(loss * weight * accelerator.num_processes)
            loss_sum += loss.item() * weight
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / len(micro)
        seqs, tokens = (sum(c) for c in zip(*map(batch_counts, micro)))
        losses, sums = distributed.reduce(parts_sum, {"loss": loss_sum, "seqs": seqs, "tokens": tokens})
        losses = {"loss": sums["loss"], **losses}
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips a step that overflowed
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = losses["loss"]
        window.add_step(losses, int(sums["seqs"]), int(sums["tokens"]))
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(step_loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{window.rates()['tokens_per_s']:,.0f}",
                        refresh=False)
        if step % args.log_every == 0 or step == steps:
            if main:
                values = window.summary()
                log.write(step, **{f"train_{k}": v for k, v in values.items()}, train_lr=lr)
                shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if k.endswith("loss"))
                tqdm.write(f"step {step}/{steps} (mean of {window.steps} steps): {shown}  lr {lr:.2e}  "
                           f"{values['steps_per_s']:.2f} steps/s  "
                           f"{values['seqs_per_s']:,.1f} seqs/s  {values['tokens_per_s']:,.0f} tokens/s")
            window = _Window()
        if validates and ((args.eval_every and step % args.eval_every == 0) or step == steps):
            if main or layout.everyone_validates:
                eval_metrics = _validate(model, eval_examples, collate, args, evaluation, accelerator.autocast)
            best = main and evaluation is not None and evaluation.best and \
                eval_metrics[evaluation.best] > _best_so_far(out, evaluation.best)
            weights = layout.whole_weights() if distributed.from_main(best) else None
            if main:
                log.write(step, **{f"eval_{k}": v for k, v in eval_metrics.items()})
                tqdm.write(f"step {step}: " + "  ".join(f"eval_{k} {v:.4f}" for k, v in eval_metrics.items()))
                if best:
                    _save_best(out, model, tokenizer, {"step": step, **eval_metrics}, chat_trained, weights)
                    tqdm.write(f"step {step}: best {evaluation.best} so far, saved to {out / BEST}")
            eval_metrics = distributed.from_main(eval_metrics)
        if (args.save_every and step % args.save_every == 0) or step == steps:
            _save_checkpoint(out, step, layout, tokenizer, scheduler, cfg, args.save_total_limit, chat_trained,
                             distributed.gather(_rng_state()))
    bar.close()
    result = {"steps": steps, "train_loss": last_loss}
    if eval_metrics is not None:
        result.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    weights = layout.whole_weights()  # gathered anew: save_pretrained consumes its dict
    if main:
        _save_final(out, model, tokenizer, chat_trained, weights)
        if evaluation is not None and evaluation.best and (out / BEST).is_dir():
            _replace_files(out / BEST, out)  # the final model is the best one
            best = json.loads((out / BEST / "metrics.json").read_text(encoding="utf-8"))
            result.update({f"best_{k}": v for k, v in best.items()})
        log.plot(out / "loss_curve.png")
        log.tb.close()
        (out / "train_result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    distributed.barrier()
    result = distributed.from_main(result)
    print(json.dumps(result))
    return result


def _validate(model, eval_examples, collate, args: TrainArgs, evaluation: Evaluation | None,
              autocast) -> dict[str, float]:
    """The validation metrics: the stage's own, or the loss (and perplexity) on `eval_examples`."""
    if evaluation is None:
        eval_loss = evaluate_loss(model, eval_examples, collate, args.batch_size, autocast)
        return {"loss": eval_loss, "ppl": math.exp(min(eval_loss, 50))}
    model.eval()
    with torch.no_grad(), autocast():
        metrics = evaluation.run(model)
    model.train()
    return metrics
