"""Fine-tuning methods: which weights a training run changes.

`full` trains every weight. `lora` (low-rank updates B·A beside chosen linear layers) and `prefix`
(P-Tuning v2: trained key/value prefixes in every layer) wrap the model in a peft `PeftModel`, so
checkpoints and the output are small adapter directories on top of an unchanged base. `freeze`
trains only the last transformer layers (and any named modules) of a plain model, whose output is
a full model. peft does the adapting; this module turns huayu's options into peft's and explains
options that cannot work, naming the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from huayu.config import field_doc
from huayu.errors import HuayuError

METHODS = ("full", "lora", "prefix", "freeze")
ADAPTER_METHODS = ("lora", "prefix")


@dataclass
class FinetuningArgs:
    finetuning_type: str = field_doc(f"which weights to train: {'|'.join(METHODS)}", default="full",
                                     aliases=("--method",))
    lora_rank: int = field_doc("lora: rank r of the update B·A", default=8)
    lora_alpha: int = field_doc("lora: the update is scaled by alpha / r", default=16)
    lora_dropout: float = field_doc("lora: dropout on the adapter's input", default=0.05)
    lora_target: list[str] = field_doc("lora: names of the modules to adapt; all-linear: every linear layer in "
                                       "the transformer blocks (default: the architecture's attention projections)",
                                       default_factory=list)
    pre_seq_len: int = field_doc("prefix: virtual tokens prepended to every layer's keys and values (P-Tuning v2)",
                                 default=16)
    prefix_projection: bool = field_doc("prefix: produce the prefix through a two-layer MLP (more parameters)",
                                        default=False)
    freeze_trainable_layers: int = field_doc("freeze: train the last N transformer layers", default=2)
    freeze_trainable_modules: list[str] = field_doc("freeze: also train the parameters whose names match one of "
                                                    "these regular expressions (e.g. model.norm)",
                                                    default_factory=list)

    @property
    def uses_adapter(self) -> bool:
        return self.finetuning_type in ADAPTER_METHODS


def check_finetuning(args: FinetuningArgs) -> None:
    """Reject options that cannot work, before any model is loaded."""
    if args.finetuning_type not in METHODS:
        raise HuayuError(f"--finetuning-type must be one of {', '.join(METHODS)}, got '{args.finetuning_type}'")
    rules = [("lora_rank", args.lora_rank >= 1, "at least 1"),
             ("lora_alpha", args.lora_alpha > 0, "positive"),
             ("lora_dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
             ("pre_seq_len", args.pre_seq_len >= 1, "at least 1"),
             ("freeze_trainable_layers", args.freeze_trainable_layers >= 0, "0 or more")]
    for name, ok, what in rules:
        if not ok:
            raise HuayuError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    for pattern in args.freeze_trainable_modules:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise HuayuError(f"--freeze-trainable-modules: '{pattern}' is not a regular expression: {exc}") from None
    if args.finetuning_type == "freeze" and not (args.freeze_trainable_layers or args.freeze_trainable_modules):
        raise HuayuError("--finetuning-type freeze with --freeze-trainable-layers 0 trains nothing: "
                         "also pass --freeze-trainable-modules")


def apply_finetuning(model, args: FinetuningArgs):
    """`model` prepared for `args.finetuning_type`: a PeftModel for lora/prefix (base weights
    frozen), the same model otherwise (all of it, or only the chosen layers, trainable)."""
    from huayu.quantization import is_quantized

    check_finetuning(args)
    if is_quantized(model.config):
        raise HuayuError("the model is quantized, for inference only: train the full-precision model "
                         "(and quantize the result with huayu quantize)")
    return _APPLY[args.finetuning_type](model, args)


def _full(model, args: FinetuningArgs):
    return model


def _lora(model, args: FinetuningArgs):
    from peft import LoraConfig

    from huayu.models.families import has_transposed_linears, lora_targets

    config = LoraConfig(task_type=_peft_task(model), r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=lora_targets(model, args.lora_target),
                        fan_in_fan_out=has_transposed_linears(model))
    return _wrap(model, config, "--lora-target")


def _prefix(model, args: FinetuningArgs):
    from peft import PrefixTuningConfig

    from huayu.models.families import cache_argument

    if cache_argument(model) is None:
        raise HuayuError(f"--finetuning-type prefix needs a model that takes past key/values; "
                         f"{type(model).__name__} does not: use --finetuning-type lora")
    config = PrefixTuningConfig(task_type=_peft_task(model), num_virtual_tokens=args.pre_seq_len,
                                prefix_projection=args.prefix_projection)
    return _wrap(model, config, "--finetuning-type prefix")


def _is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _peft_task(model) -> str:
    """peft's task type: a sequence classifier's (a reward model), whose new head peft then trains
    and saves with the adapter, or the family's."""
    from huayu.models.families import family_of

    return "SEQ_CLS" if _is_classifier(model) else family_of(model.config).peft_task


def _wrap(model, config, flag: str):
    """get_peft_model, with its complaints (e.g. target modules the model lacks) as HuayuErrors."""
    from peft import get_peft_model

    from huayu.models.loading import peft_quietly

    try:
        with peft_quietly():
            return get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise HuayuError(f"{flag}: peft cannot adapt {type(model).__name__}: {exc}") from None


def _freeze(model, args: FinetuningArgs):
    """Train the last N blocks and the parameters matching the patterns; the embeddings, the other
    blocks and the final norm (unless named) stay as they are. A classifier's head (everything
    outside its base model, new when fine-tuning starts) always trains."""
    from huayu.models.families import transformer_layers

    prefix, layers = transformer_layers(model)
    n = args.freeze_trainable_layers
    if n > len(layers):
        raise HuayuError(f"--freeze-trainable-layers {n}: the model has only {len(layers)} layers")
    names = [name for name, _ in model.named_parameters()]
    patterns = [re.compile(p) for p in args.freeze_trainable_modules]
    for pattern in patterns:
        if not any(pattern.search(name) for name in names):
            raise HuayuError(f"--freeze-trainable-modules: '{pattern.pattern}' matches no parameter "
                             f"(names look like {names[0]}, {names[-1]})")
    last = tuple(f"{prefix}.{i}." for i in range(len(layers) - n, len(layers)))
    head = _is_classifier(model)
    for name, param in model.named_parameters():
        in_head = head and not name.startswith(f"{model.base_model_prefix}.")
        param.requires_grad_(in_head or name.startswith(last) or any(p.search(name) for p in patterns))
    return model


_APPLY = {"full": _full, "lora": _lora, "prefix": _prefix, "freeze": _freeze}
