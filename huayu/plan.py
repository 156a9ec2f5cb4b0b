"""`huayu plan MODEL`: will it fit? The memory a training step (or inference) needs, before a weight is loaded.

The model is built from its config alone under PyTorch's FakeTensorMode (tensors with shapes and dtypes
but no storage), prepared as the training stage prepares it (full, peft LoRA / prefix, freeze), and two
training steps (forward, loss, backward, AdamW step; the second with the optimiser's state) run on a
batch of the requested shape while torch's MemTracker sorts every live tensor's bytes by kind. The count
is therefore the architecture's own -- fp32 logits, the attention implementation, peft's extra tensors,
GLM's 3-D masks -- with no per-architecture formula to drift from the code.

A process needs more than its tensors, and that part is measured, not modelled: the interpreter +
torch + transformers baseline is this process's resident memory after importing what training imports,
and glibc's allocator keeps freed activation memory for reuse, which on the measured runs costs
`CPU_ALLOCATOR_FACTOR` x the step's transient memory (docs/plan.md has the measurements). A GPU's
caching allocator and CUDA context differ; there the tensor peak is the figure to compare.
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.errors import HuayuError
from huayu.train.methods import FinetuningArgs

MiB = 2 ** 20
BITS = (32, 16, 8, 4)
# On glibc, freed tensor memory below the (self-raising) mmap threshold stays in the heap and is reused
# with fragmentation: the measured peak RSS of training steps is 1.55-2.1x their transient tensor memory
# above the weights and optimiser state (full 1.55, LoRA 2.1, prefix 1.9, bf16 1.95: docs/plan.md).
# MALLOC_MMAP_THRESHOLD_ fixes the threshold, and with it the process tracks its live tensors (~1.0x),
# at ~30% slower steps on this machine.
CPU_ALLOCATOR_FACTOR = 1.75
# What a training process holds beyond the baseline and its tensors: kernels' scratch space, thread
# pools, the data and tokenizer of a small run (measured: 30-60 MiB).
CPU_FIXED_OVERHEAD = 48 * MiB
MLM_FRACTION = 0.15  # huayu's masked-LM loss runs the prediction head on the masked positions only


@dataclass
class PlanConfig:
    model: str = field_doc("a preset name (tiny, small, t5-small, bert-tiny, glm-small, ...) or a local HF model "
                           "directory (only its config is read)", positional=True, default=None)
    tokenizer: str | None = field_doc("tokenizer directory, for a preset's vocabulary size", default=None)
    vocab_size: int = field_doc("a preset's vocabulary size, instead of --tokenizer", default=0)
    finetuning: FinetuningArgs = field_doc("fine-tuning", default_factory=FinetuningArgs)
    seq_len: int = field_doc("tokens per sequence (encoder-decoders: of the encoder input)", default=512)
    target_len: int = field_doc("encoder-decoders: tokens of the decoder's target (default: --seq-len)",
                                default=0)
    batch: int = field_doc("sequences per micro-batch (per process)", default=8)
    bits: int = field_doc("32: fp32; 16: bf16 (training: --bf16 autocast; inference: bf16 weights); "
                          "8 / 4: int8 / int4 weights (huayu quantize), inference only", default=32)
    inference: bool = field_doc("plan serving (one forward over the prompt, with its KV cache) instead of "
                                "a training step", default=False)
    json: bool = field_doc("print the estimate as JSON", default=False)


@dataclass
class Estimate:
    """Bytes by kind; `peak_tensors` is the most that is live at once, `process_rss` adds what a CPU
    process holds besides."""
    model: str
    architecture: str
    what: str
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    peak_tensors: int
    baseline: int
    process_rss: int
    notes: list[str] = field(default_factory=list)


def check(cfg: PlanConfig) -> None:
    from huayu.train.methods import check_finetuning

    if not cfg.model:
        raise HuayuError("usage: huayu plan MODEL --method full|lora|prefix|freeze --seq-len L --batch B [--bits N]")
    check_finetuning(cfg.finetuning)
    if cfg.bits not in BITS:
        raise HuayuError(f"--bits must be one of {', '.join(map(str, BITS))}, got {cfg.bits}")
    if cfg.bits in (8, 4) and not cfg.inference:
        raise HuayuError(f"--bits {cfg.bits}: quantized models are for inference only (huayu trains the full-"
                         "precision model and `huayu quantize`s the result): add --inference")
    for name in ("seq_len", "batch"):
        if getattr(cfg, name) < 1:
            raise HuayuError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def model_config(cfg: PlanConfig):
    """The transformers config of a model directory, or of a preset sized to the vocabulary."""
    from pathlib import Path

    from huayu.models.families import family_of_preset

    if Path(cfg.model).is_dir():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as exc:
            raise HuayuError(f"cannot read a model config from '{cfg.model}': {exc}") from None
    family = family_of_preset(cfg.model)
    if family is None:
        raise HuayuError(f"'{cfg.model}' is neither a model directory nor a preset")
    if cfg.tokenizer:
        from huayu.models.loading import load_tokenizer

        tok = load_tokenizer(cfg.model, cfg.tokenizer)
        special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       **family.special_ids(tok))
        return family.build_config(cfg.model, len(tok), special)
    if cfg.vocab_size <= len(family.special_tokens) + 3:
        raise HuayuError(f"'{cfg.model}' is a preset: pass --tokenizer DIR or --vocab-size N")
    # without a tokenizer the special tokens take the last ids; only their count matters here
    ids = iter(range(cfg.vocab_size - 1, 0, -1))
    special = dict(pad_token_id=next(ids), bos_token_id=next(ids), eos_token_id=next(ids),
                   **{key: next(ids) for key in family.special_tokens})
    return family.build_config(cfg.model, cfg.vocab_size, special)


def _batch(cfg: PlanConfig, family) -> dict:
    """A batch of the planned shape, laid out as the family's training batches are."""

    from huayu.models.families import BLANK

    b, n = cfg.batch, cfg.seq_len
    ids = torch.zeros(b, n, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, n, dtype=torch.long)}
    if family.seq2seq:
        batch["labels"] = torch.zeros(b, cfg.target_len or n, dtype=torch.long)
    elif family.layout == BLANK:  # the blank-infilling collate's explicit 3-D mask and 2-D positions
        batch.update(attention_mask=torch.ones(b, n, n, dtype=torch.bool),
                     position_ids=torch.zeros(b, 2, n, dtype=torch.long), labels=ids)
    else:
        batch["labels"] = ids
    if cfg.inference:
        batch.pop("labels")
        if family.seq2seq:
            batch["decoder_input_ids"] = torch.zeros(b, 1, dtype=torch.long)
    return batch


def _loss(model, batch: dict, family):
    """A training step's loss, computed as huayu's stages compute it (masked LM: the head on the masked
    positions only, here the first 15% of each row: the same shapes without reading the data)."""
    import torch.nn.functional as F

    from huayu.data.whole_word_masking import pretraining_heads
    from huayu.models.families import ENCODE

    core, heads = pretraining_heads(model)
    if family.layout == ENCODE and heads is not None:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        sequence = core.base_model(**inputs, return_dict=False)[0]
        masked = sequence[:, :max(1, round(MLM_FRACTION * sequence.shape[1]))]
        logits = heads.predictions(masked.reshape(-1, masked.shape[-1])).float()
        return F.cross_entropy(logits, batch["labels"][:, :masked.shape[1]].reshape(-1))
    return model(**batch).loss


def _baseline() -> int:
    """This process's resident memory now, with what a training command imports loaded."""
    import tqdm  # noqa: F401
    from torch.utils import tensorboard  # noqa: F401

    with open("/proc/self/status", encoding="ascii") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive, and their peak, while the mode is active: every op's
    outputs are counted until Python frees them (fake tensors too, whose sizes are their shapes')."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def hold(self, *tensors) -> int:
        """Count tensors made before the mode (the weights); their bytes."""
        before = self.live
        for tensor in tensors:
            self._count(tensor)
        return self.live - before

    def _count(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out


def _fake_cpu_tensors(model, mode) -> None:
    """Every parameter and buffer of a meta-device `model` replaced by a CPU fake tensor of its shape
    (CPU: what autocast and the CPU kernels' shape rules apply to); tied weights stay tied."""
    made: dict[int, torch.Tensor] = {}
    with mode:
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(tensor) not in made:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    made[id(tensor)] = (torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                                        if isinstance(tensor, torch.nn.Parameter) else fake)
                if name in module._parameters:
                    module._parameters[name] = made[id(tensor)]
                else:
                    module._buffers[name] = made[id(tensor)]


def estimate(cfg: PlanConfig) -> Estimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from huayu.models.families import family_of
    from huayu.models.loading import count_parameters
    from huayu.quantization import RECORD, quantize_model
    from huayu.train.methods import apply_finetuning

    check(cfg)
    config = model_config(cfg)
    record = getattr(config, RECORD, None)
    if record:
        if not cfg.inference:
            raise HuayuError(f"'{cfg.model}' is quantized, for inference only: add --inference")
        delattr(config, RECORD)
    family = family_of(config)
    baseline = _baseline()
    notes = []
    with torch.device("meta"):  # peft adapts a model on the meta device as it does a real one
        model = family.auto().from_config(config)
    if not cfg.inference:
        model = apply_finetuning(model, cfg.finetuning)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_cpu_tensors(model, mode)
    trainable, total = count_parameters(model)  # before quantization turns weights into buffers
    bits = record["bits"] if record else cfg.bits
    with mode:
        if bits in (8, 4):
            quantize_model(model, bits, (record["group_size"] or 32) if record else 32)
        elif bits == 16 and cfg.inference:
            model = model.to(torch.bfloat16)
    batch = _batch(cfg, family)
    memory = LiveTensorBytes()
    weights = memory.hold(*model.parameters(), *model.buffers())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bits == 16 and not cfg.inference)
    optimizer_bytes = activations = 0
    with mode, memory:
        if cfg.inference:
            model.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' own renaming of the cache argument
                output = model(**batch, use_cache=True)
            activations = memory.live - weights  # the KV cache and the logits
            del output
        else:
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            for _ in range(2):  # the second step runs with the optimiser's state
                with autocast:
                    loss = _loss(model, batch, family)
                activations = memory.live - weights - optimizer_bytes
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_bytes = sum(t.untyped_storage().nbytes() for state in optimizer.state.values()
                                      for t in state.values() if isinstance(t, torch.Tensor) and t.dim())
                del loss
    gradients = 0 if cfg.inference else sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    transient = memory.peak - weights - optimizer_bytes
    factor = 1.0 if "MALLOC_MMAP_THRESHOLD_" in os.environ else CPU_ALLOCATOR_FACTOR
    process = baseline + weights + optimizer_bytes + round(factor * transient) + CPU_FIXED_OVERHEAD
    if cfg.inference:
        what = f"inference: one forward over {cfg.batch} x {cfg.seq_len} prompt tokens with its KV cache"
    else:
        what = (f"{cfg.finetuning.finetuning_type} fine-tuning step, {cfg.batch} x {cfg.seq_len} tokens"
                + (f" -> {cfg.target_len or cfg.seq_len} target tokens" if family.seq2seq else ""))
    what += {32: ", fp32", 16: ", bf16" if cfg.inference else ", fp32 weights with bf16 autocast",
             8: ", int8 weights", 4: ", int4 weights"}[bits]
    if not cfg.inference:
        notes.append("per process: data-parallel processes each hold all of it; --grad-accum changes nothing here")
    return Estimate(cfg.model, type(model).__name__, what, total, trainable, weights, gradients, optimizer_bytes,
                    activations, transient - activations, memory.peak, baseline, process, notes)


def render(est: Estimate) -> str:
    def mib(n: int) -> str:
        return f"{n / MiB:>10,.1f} MiB"

    share = 100 * est.trainable / max(est.parameters, 1)
    rows = [f"{est.model} ({est.architecture}): {est.what}",
            f"parameters {est.parameters:,}" + (f", trainable {est.trainable:,} ({share:.2f}%)"
                                                if "inference" not in est.what else ""),
            f"  weights and buffers   {mib(est.weights)}"]
    if "inference" not in est.what:
        rows += [f"  gradients             {mib(est.gradients)}   (of the trainable weights; freed every step)",
                 f"  optimiser state       {mib(est.optimizer)}   (AdamW: two moments per trainable weight)"]
    training = "inference" not in est.what
    rows += [f"  activations           {mib(est.activations)}   "
             + ("(what the forward keeps for backward)" if training else "(the KV cache and the logits)"),
             f"  temporaries at peak   {mib(est.temporaries)}   "
             + ("(gradients in flight, intermediate results)" if training else "(intermediate results)"),
             f"  tensors at the peak   {mib(est.peak_tensors)}   (what an accelerator would hold, before its runtime)",
             f"  CPU process, peak RSS {mib(est.process_rss)}   (with the framework's {est.baseline / MiB:,.0f} MiB "
             "and the allocator's slack)"]
    return "\n".join(rows + [f"note: {n}" for n in est.notes])


def add_arguments(parser) -> None:
    add_config_arguments(parser, PlanConfig)


def run(args) -> None:
    from dataclasses import asdict

    cfg = config_from_args(PlanConfig, args)
    est = estimate(cfg)
    print(json.dumps(asdict(est), indent=2) if cfg.json else render(est))
