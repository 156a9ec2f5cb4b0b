"""What every training stage shares: its config core and the setup around the one loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huayu.config import field_doc
from huayu.errors import HuayuError
from huayu.train.loop import CHECKPOINTS, TrainArgs, fit, latest_checkpoint
from huayu.train.schedules import SCHEDULES


@dataclass
class StageConfig:
    model: str = field_doc("a preset name (tiny, small, base, gpt3-base, ...) or a local HF model directory",
                           default="tiny")
    tokenizer: str | None = field_doc("tokenizer directory (default: the model's own)", default=None)
    data: list[str] = field_doc("training data files or directories", default_factory=list)
    valid_data: list[str] = field_doc("validation data (evaluated every eval_every steps)", default_factory=list)
    out: str = field_doc("output directory", default="out/run")
    skip_invalid: bool = field_doc("skip malformed records (and report how many) instead of stopping",
                                   default=False)
    train: TrainArgs = field_doc("optimisation", default_factory=TrainArgs)


def check(cfg: StageConfig) -> None:
    if not cfg.data:
        raise HuayuError("no training data: pass --data PATH")
    if cfg.train.schedule not in SCHEDULES:
        raise HuayuError(f"--train.schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.train.schedule}'")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg.train, name) < 1:
            raise HuayuError(f"--train.{name} must be at least 1")
    if cfg.train.lr <= 0:
        raise HuayuError("--train.lr must be positive")
    if (Path(cfg.out) / CHECKPOINTS).is_dir() and not cfg.train.resume:
        raise HuayuError(f"'{cfg.out}' already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --out")


def run_stage(cfg: StageConfig, build_examples) -> dict:
    """Load the tokenizer and model (from the last checkpoint when resuming), build the examples
    with `build_examples(tokenizer) -> (train, valid or None)`, and train."""
    from huayu.models.loading import count_parameters, load_model, load_tokenizer

    check(cfg)
    ckpt = latest_checkpoint(cfg.out) if cfg.train.resume else None
    if cfg.train.resume and ckpt is None:
        print(f"no checkpoint under {cfg.out}; starting from the beginning")
    source = str(ckpt) if ckpt else cfg.model
    tokenizer = load_tokenizer(source, None if ckpt else cfg.tokenizer)
    train, valid = build_examples(tokenizer)
    if not train:
        raise HuayuError("the training data produced no examples")
    model = load_model(source, tokenizer, seed=cfg.train.seed)
    trainable, total = count_parameters(model)
    print(f"model: {type(model).__name__} from '{source}': {total:,} parameters, {trainable:,} trainable "
          f"({100 * trainable / total:.2f}%); {len(train):,} training examples")
    from huayu.data.batching import pad_collate

    return fit(model, tokenizer, train, pad_collate(tokenizer.pad_token_id), cfg.train, cfg.out, cfg,
               eval_examples=valid, resume_from=ckpt)
