"""What every training stage shares: its config core and the setup around the one loop."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from huayu.config import field_doc
from huayu.errors import HuayuError
from huayu.models.loading import LoadingArgs
from huayu.outputs import OVERWRITE_HELP, check_output_dir, claim_output_dir, output_owner
from huayu.train import distributed
from huayu.train.loop import CHECKPOINTS, Evaluation, LossFn, TrainArgs, fit, latest_checkpoint, model_loss
from huayu.train.methods import FinetuningArgs, apply_finetuning, check_finetuning
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
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)
    finetuning: FinetuningArgs = field_doc("which weights to train", default_factory=FinetuningArgs)
    loading: LoadingArgs = field_doc("how the model is loaded", default_factory=LoadingArgs)
    train: TrainArgs = field_doc("optimisation", default_factory=TrainArgs)


@dataclass
class StageData:
    """What a stage trains on. Without `collate`, batches are the model family's; a stage whose
    batches or loss are its own (masked LM, classification) says so here; `classes` makes the
    model a sequence classifier over them."""
    train: list
    valid: list | None = None
    collate: Callable | None = None
    loss_fn: LossFn = model_loss
    evaluation: Evaluation | None = None
    classes: list[str] | None = None
    check_model: Callable | None = None  # called with the model before training: refuses what it cannot train,
    #                                      or readies what the loss needs beside it (DPO's reference)


def _is_own_run(out: Path, command: str, overwrite: bool) -> bool:
    """Whether `out` holds an earlier run of `command` (without a record: a training run of a huayu
    that wrote none, its config and checkpoints); anything else but an empty `out` is refused
    unless `overwrite` (huayu.outputs)."""
    if output_owner(out) is None and (out / CHECKPOINTS).is_dir() and (out / "config.yaml").exists():
        return True
    return check_output_dir(out, command, overwrite)


def check(cfg: StageConfig, command: str) -> None:
    from huayu.models.loading import is_adapter_dir

    if not cfg.data:
        raise HuayuError("no training data: pass --data PATH")
    check_finetuning(cfg.finetuning)
    if cfg.loading.quantization_bit is not None and cfg.finetuning.finetuning_type != "lora":
        raise HuayuError(f"--quantization-bit trains a LoRA adapter on a quantized base (QLoRA): use "
                         f"--finetuning-type lora, not {cfg.finetuning.finetuning_type}")
    cfg.loading.check()
    if cfg.train.fsdp and cfg.train.deepspeed:
        raise HuayuError("--fsdp and --deepspeed exclude each other: both shard the model")
    distributed.check_precision(cfg.train.device, cfg.train.bf16, cfg.train.fp16)
    if is_adapter_dir(cfg.model):
        raise HuayuError(f"--model '{cfg.model}' is an adapter: merge it into its base first "
                         f"(huayu export merge BASE {cfg.model} --out DIR) and train DIR")
    if cfg.finetuning.uses_adapter and not Path(cfg.model, "config.json").exists():
        raise HuayuError(f"--finetuning-type {cfg.finetuning.finetuning_type} needs a trained base model directory "
                         f"as --model, not '{cfg.model}': an adapter on a randomly initialised preset could not "
                         "be loaded again")
    if cfg.train.schedule not in SCHEDULES:
        raise HuayuError(f"--train.schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.train.schedule}'")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg.train, name) < 1:
            raise HuayuError(f"--train.{name} must be at least 1")
    if cfg.train.lr <= 0:
        raise HuayuError("--train.lr must be positive")
    if _is_own_run(Path(cfg.out), command, cfg.overwrite) and (Path(cfg.out) / CHECKPOINTS).is_dir() \
            and not cfg.train.resume:
        raise HuayuError(f"'{cfg.out}' already holds checkpoints of an earlier run: pass --resume to continue "
                         "that run, or choose another --out")


def run_stage(cfg: StageConfig, command: str, build_examples, chat_trained: bool = False) -> dict:
    """Load the tokenizer and model (from the last checkpoint when resuming), build the examples
    with `build_examples(tokenizer) -> (train, valid or None)` or a StageData, and train `command`'s
    model into cfg.out. `chat_trained`: the examples are rendered with the chat template, which the
    outputs then record. Under torchrun every process runs this; rank 0 builds (and caches) the
    examples first."""
    check(cfg, command)
    if cfg.train.deepspeed:
        distributed.request_deepspeed(cfg.train.deepspeed)
    with distributed.session(cfg.train.device):
        return _run_stage(cfg, command, build_examples, chat_trained)


def _run_stage(cfg: StageConfig, command: str, build_examples, chat_trained: bool) -> dict:
    from huayu.models.loading import count_parameters, load_tokenizer

    if distributed.is_main():
        claim_output_dir(cfg.out, command, overwrite=True)  # check() applied the rule
    ckpt = latest_checkpoint(cfg.out) if cfg.train.resume else None
    if cfg.train.resume and ckpt is None:
        print(f"no checkpoint under {cfg.out}; starting from the beginning")
    source = str(ckpt) if ckpt else cfg.model
    tokenizer = load_tokenizer(source, None if ckpt else cfg.tokenizer)
    with distributed.main_process_first():
        data = build_examples(tokenizer)
    data = data if isinstance(data, StageData) else StageData(*data)
    train, valid = data.train, data.valid
    if not len(train):
        raise HuayuError("the training data produced no examples")
    model = trainable_model(cfg, tokenizer, ckpt, data.classes)
    if data.check_model is not None:
        data.check_model(model)
    trainable, total = count_parameters(model)
    world = distributed.world_size()
    print(f"model: {type(model).__name__} from '{source}', {cfg.finetuning.finetuning_type} fine-tuning: "
          f"{total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%); "
          f"{len(train):,} training examples" + (f"; {world} processes x {cfg.train.batch_size} examples x "
                                                 f"{cfg.train.grad_accum} micro-batches per step" if world > 1 else ""))
    from huayu.models.families import family_of

    collate = data.collate or family_of(model.config).collate(tokenizer.pad_token_id)
    return fit(model, tokenizer, train, collate, cfg.train, cfg.out, cfg, eval_examples=valid, resume_from=ckpt,
               chat_trained=chat_trained, loss_fn=data.loss_fn, evaluation=data.evaluation)


def trainable_model(cfg: StageConfig, tokenizer, ckpt: Path | None, classes: list[str] | None = None):
    """The model to train, its trainable parameters set by the fine-tuning method. Resuming, the
    weights come from the checkpoint: a full model, or an adapter put back on its base (cfg.model)
    with the same trainable parameters, so the saved optimiser state fits them; a sharded
    checkpoint's are put back by the loop, into the model built as at the start."""
    from huayu.models.loading import is_adapter_dir, load_model
    from huayu.train.parallel import checkpoint_layout

    options = dict(classes=classes, loading=cfg.loading, prepare_base=lambda base: for_training(base, cfg))
    if ckpt is not None and checkpoint_layout(ckpt)["kind"] != "replicated":
        check_same_method(cfg, ckpt)
        ckpt = None
    if ckpt is None:
        model = apply_finetuning(load_model(cfg.model, tokenizer, seed=cfg.train.seed, **options), cfg.finetuning)
    else:
        check_same_method(cfg, ckpt)
        model = load_model(cfg.model, tokenizer, adapter=str(ckpt), trainable_adapter=True, **options) \
            if is_adapter_dir(ckpt) else apply_finetuning(load_model(str(ckpt), tokenizer, **options), cfg.finetuning)
    return with_master_weights(model, cfg)


def for_training(model, cfg: StageConfig):
    """The loaded base made ready to train: k-bit layers prepared (QLoRA), gradient checkpointing
    (with the input-grad hook that lets an adapter's gradients through a frozen, checkpointed base)."""
    if cfg.loading.quantization_bit is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise HuayuError(f"--gradient-checkpointing: {model.config.model_type} models do not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.finetuning.uses_adapter:
            model.enable_input_require_grads()
    if cfg.train.gradient_checkpointing:
        model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation
    return model


def with_master_weights(model, cfg: StageConfig):
    """fp32 master weights for trained bf16/fp16 weights, unless --pure-bf16 (said, never silent).
    With --bf16 autocast only the trained weights are upcast (a frozen base stays small, as in
    LLaMA-Factory); without it the whole model is, since its layers must share one dtype."""
    import torch

    half = (torch.bfloat16, torch.float16)
    trained = [p for p in model.parameters() if p.requires_grad and p.dtype in half]
    if cfg.train.pure_bf16:
        print("warning: --pure-bf16: weights, gradients and optimiser state in bf16; small updates may be "
              "rounded away", file=sys.stderr)
        return model.to(torch.bfloat16) if cfg.loading.quantization_bit is None else model
    if not trained:
        return model
    print(f"note: {len(trained)} trained weight tensors are {trained[0].dtype}: training them with fp32 master "
          "weights (--pure-bf16 keeps them in bf16 to halve their memory)", file=sys.stderr)
    if not (cfg.train.bf16 or cfg.train.fp16):
        return model.float()
    for p in trained:
        p.data = p.data.float()
    return model


def check_same_method(cfg: StageConfig, ckpt: Path) -> None:
    """A run resumes only with the fine-tuning options it was started with: others would train
    different parameters than the checkpoint's optimiser state belongs to."""
    import yaml

    saved = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")).get("finetuning", {})
    started, now = {**asdict(FinetuningArgs()), **saved}, asdict(cfg.finetuning)
    if started != now:
        changed = ", ".join(f"--{k.replace('_', '-')} {started[k]} -> {now[k]}"
                            for k in now if started[k] != now[k])
        raise HuayuError(f"--resume: {ckpt} was trained with other fine-tuning options ({changed}); "
                         "resume with the original ones or choose another --out")
