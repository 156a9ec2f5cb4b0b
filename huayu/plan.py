"""`huayu plan MODEL`: will it fit? The memory a training step (or inference) needs, before a weight is loaded.

The model is built from its config alone under PyTorch's FakeTensorMode (tensors with shapes and dtypes
but no storage), prepared as the training stage prepares it (full, peft LoRA / prefix, freeze, gradient
checkpointing), and training steps (forward, loss, backward, AdamW step) run on a batch of the
requested shape while a dispatch mode sorts every live tensor's bytes by kind. The count is therefore
the architecture's own -- fp32 logits, the attention implementation, peft's extra tensors, GLM's 3-D
masks, what checkpointing recomputes -- with no per-architecture formula to drift from the code.

A process needs more than its tensors, and that part is measured, not modelled: the interpreter +
torch + transformers baseline is this process's resident memory after importing what training imports,
and glibc's allocator keeps freed activation memory for reuse, which on the measured runs costs
`CPU_ALLOCATOR_FACTOR` x the step's transient memory (docs/plan.md has the measurements).

`--gpus N` plans for GPUs instead. The model is prepared in the dtypes a GPU run holds (bf16 weights
with --bf16, fp32 master copies of the trained ones unless --pure-bf16, fp32 for what QLoRA leaves
unquantized, as peft's prepare_model_for_kbit_training makes it), AdamW runs as torch runs it on CUDA
(foreach: one more copy of the trained weights while it steps), and the measured parts are summed per
GPU. What fake tensors cannot show is arithmetic on them, with its constants below: bitsandbytes'
storage of a quantized weight, DDP's gradient buckets, FSDP / ZeRO-3's sharding and gathered layers,
and the CUDA context.
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

MiB, GiB = 2 ** 20, 2 ** 30
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
SHARDINGS = ("none", "ddp", "fsdp")
CARDS_GB = (24, 40, 80)  # the usual cards' memory, compared as GiB (an 80 GB H100 has 79.6 GiB)
# bitsandbytes' bytes per quantized weight. NF4 with double quantization: 4 bits, an 8-bit absmax per block
# of 64 weights and an fp32 constant per 256 such blocks, 4 + 8/64 + 32/(64*256) = 4.127 bits. LLM.int8:
# one byte (and one fp32 scale per output row, 0.1% of a 4096-wide layer, left out).
QUANTIZED_BYTES = {4: (4 + 8 / 64 + 32 / (64 * 256)) / 8, 8: 1.0}
QUANTIZED_NAMES = {4: "nf4", 8: "int8"}
# What a CUDA training process holds beside its tensors: the CUDA context and kernels (~0.5 GiB with
# torch 2's lazy module loading), cuBLAS workspaces, NCCL's buffers and the caching allocator's reserve.
CUDA_OVERHEAD = GiB
# Llama-architecture shapes to plan with, without a download (no tokenizer or weights: planning only);
# --vocab-size replaces the vocabulary, e.g. 49,953 for Chinese-LLaMA's.
PLANNING_MODELS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      vocab_size=32000),
}


@dataclass
class PlanConfig:
    model: str = field_doc(f"a preset name (tiny, small, t5-small, bert-tiny, glm-small, ...), a planning shape "
                           f"({', '.join(PLANNING_MODELS)}) or a local HF model directory (only its config is read)",
                           positional=True, default=None)
    tokenizer: str | None = field_doc("tokenizer directory, for a preset's vocabulary size", default=None)
    vocab_size: int = field_doc("a preset's vocabulary size, instead of --tokenizer (a planning shape's: "
                                "instead of its own)", default=0)
    finetuning: FinetuningArgs = field_doc("fine-tuning", default_factory=FinetuningArgs)
    seq_len: int = field_doc("tokens per sequence (encoder-decoders: of the encoder input)", default=512)
    target_len: int = field_doc("encoder-decoders: tokens of the decoder's target (default: --seq-len)",
                                default=0)
    batch: int = field_doc("sequences per micro-batch (per process)", default=8, aliases=("--batch-size",))
    bits: int = field_doc("32: fp32; 16: bf16 (training: --bf16 autocast; inference: bf16 weights); "
                          "8 / 4: int8 / int4 weights (huayu quantize), inference only", default=32)
    bf16: bool = field_doc("bf16 mixed precision, as training's --bf16 (the same as --bits 16); with --gpus "
                           "the weights are loaded in bf16 too", default=False)
    gradient_checkpointing: bool = field_doc("recompute activations in the backward pass, as training's flag",
                                             default=False)
    inference: bool = field_doc("plan serving (one forward over the prompt, with its KV cache) instead of "
                                "a training step", default=False)
    gpus: int = field_doc("plan for this many GPUs: the memory per GPU and which 24 / 40 / 80 GB cards it fits "
                          "(0: a CPU process)", default=0)
    sharding: str = field_doc("with --gpus: none (one GPU) | ddp (every GPU holds it all) | fsdp (weights, "
                              "gradients and optimiser state split across the GPUs: FSDP's full sharding, "
                              "DeepSpeed ZeRO-3)", default="none")
    quantization_bit: int | None = field_doc("with --gpus, QLoRA: the frozen base in 4 bits (NF4, double "
                                             "quantization) or 8 (LLM.int8), as training's flag", default=None)
    pure_bf16: bool = field_doc("with --gpus: the trained weights, their gradients and AdamW's moments in bf16, "
                                "without fp32 master weights, as training's flag", default=False)
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


@dataclass
class GpuEstimate:
    """Bytes per GPU by component (`weights_by_dtype`: the whole model's, before sharding). `per_gpu` is
    the peak: the weights, gradients and optimiser state, the larger of the activations (with FSDP's
    gathered layers) and the optimiser step's temporaries, which are never live together, and the CUDA
    overhead."""
    model: str
    architecture: str
    what: str
    parameters: int
    trainable: int
    gpus: int
    sharding: str
    weights: int
    weights_by_dtype: dict[str, int]
    gradients: int
    optimizer: int
    activations: int
    optimizer_step: int
    fsdp_gathered: int
    cuda_overhead: int
    per_gpu: int
    fits: dict[str, bool]


def check(cfg: PlanConfig) -> None:
    from huayu.train.methods import check_finetuning

    if not cfg.model:
        raise HuayuError("usage: huayu plan MODEL --method full|lora|prefix|freeze --seq-len L --batch B [--bits N] "
                         "[--gpus N --sharding none|ddp|fsdp]")
    check_finetuning(cfg.finetuning)
    if cfg.bits not in BITS:
        raise HuayuError(f"--bits must be one of {', '.join(map(str, BITS))}, got {cfg.bits}")
    if cfg.bits in (8, 4) and not cfg.inference:
        raise HuayuError(f"--bits {cfg.bits}: quantized models are for inference only (huayu trains the full-"
                         "precision model and `huayu quantize`s the result): add --inference")
    for name in ("seq_len", "batch"):
        if getattr(cfg, name) < 1:
            raise HuayuError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    rules = [(cfg.gpus >= 0, f"--gpus must be 0 (a CPU process) or more, got {cfg.gpus}"),
             (cfg.sharding in SHARDINGS, f"--sharding must be one of {', '.join(SHARDINGS)}, got '{cfg.sharding}'"),
             (cfg.gpus or not (cfg.sharding != "none" or cfg.quantization_bit or cfg.pure_bf16),
              "--sharding, --quantization-bit and --pure-bf16 plan GPU runs: add --gpus N"),
             (cfg.gpus <= 1 or cfg.sharding != "none", f"--gpus {cfg.gpus}: add --sharding ddp (every GPU holds "
                                                       "it all) or --sharding fsdp (split across the GPUs)"),
             (not cfg.gpus or cfg.bits in (32, 16), f"--bits {cfg.bits} is huayu's int{cfg.bits} for CPUs: on "
                                                    "GPUs plan bitsandbytes' with --quantization-bit"),
             (not cfg.bf16 or cfg.bits in (32, 16), f"--bf16 and --bits {cfg.bits} contradict each other: give one"),
             (cfg.quantization_bit in (None, 4, 8), f"--quantization-bit must be 4 or 8, got {cfg.quantization_bit}"),
             (not cfg.quantization_bit or cfg.inference or cfg.finetuning.finetuning_type == "lora",
              "--quantization-bit (QLoRA) trains adapters on a frozen quantized base: --finetuning-type lora"),
             (not cfg.inference or not (cfg.gradient_checkpointing or cfg.pure_bf16),
              "--gradient-checkpointing and --pure-bf16 are for training, not --inference")]
    for ok, message in rules:
        if not ok:
            raise HuayuError(message)


def model_config(cfg: PlanConfig):
    """The transformers config of a model directory, of a planning shape, or of a preset sized to the
    vocabulary."""
    from pathlib import Path

    from huayu.models.families import family_of_preset

    if Path(cfg.model).is_dir():
        from huayu.models.loading import load_config

        return load_config(cfg.model)
    if cfg.model in PLANNING_MODELS:
        from transformers import LlamaConfig

        shape = PLANNING_MODELS[cfg.model]
        return LlamaConfig(**{**shape, "vocab_size": cfg.vocab_size or shape["vocab_size"]})
    family = family_of_preset(cfg.model)
    if family is None:
        raise HuayuError(f"'{cfg.model}' is neither a model directory nor a preset "
                         f"(nor a planning shape: {', '.join(PLANNING_MODELS)})")
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
    outputs are counted until Python frees them (fake tensors too, whose sizes are their shapes').
    Storages `settle`d -- the weights, gradients and optimiser state, held from step to step -- are
    left out of `transient_peak`, the most alive besides them since `restart_transient`."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.settled = self.transient_peak = 0
        self._seen = WeakIdKeyDictionary()
        self._settled = WeakIdKeyDictionary()

    def hold(self, *tensors) -> int:
        """Count and settle tensors made before the mode (the weights); their bytes."""
        before = self.live
        self.settle(*tensors)
        return self.live - before

    def settle(self, *tensors) -> None:
        for tensor in tensors:
            self._count(tensor)
            storage = tensor.untyped_storage()
            if storage not in self._settled:
                self._settled[storage] = size = self._seen[storage]
                self.settled += size
                weakref.finalize(storage, self._unsettle, size)

    def restart_transient(self) -> int:
        """Start a new `transient_peak` from what is alive besides the settled storages now; that."""
        self.transient_peak = self.live - self.settled
        return self.transient_peak

    def _count(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self.transient_peak = max(self.transient_peak, self.live - self.settled)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def _unsettle(self, size: int) -> None:
        self.settled -= size

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


def _bf16(cfg: PlanConfig) -> bool:
    """Whether bf16 is asked for (--bf16, --pure-bf16 or --bits 16)."""
    return cfg.bf16 or cfg.pure_bf16 or cfg.bits == 16


def _bf16_compute(cfg: PlanConfig) -> bool:
    """Whether the run computes in bf16 (training: under bf16 autocast): with bf16, and QLoRA whatever
    the flags (bitsandbytes' compute dtype)."""
    return _bf16(cfg) or bool(cfg.quantization_bit)


def _setup(cfg: PlanConfig):
    """The checked plan's model config and family, and the record of a model `huayu quantize`d."""
    from huayu.models.families import family_of
    from huayu.quantization import RECORD

    check(cfg)
    config = model_config(cfg)
    record = getattr(config, RECORD, None)
    if record:
        if not cfg.inference:
            raise HuayuError(f"'{cfg.model}' is quantized, for inference only: add --inference")
        if cfg.gpus:
            raise HuayuError(f"'{cfg.model}' is quantized by huayu quantize, for CPUs: plan its full-precision "
                             "model with --quantization-bit")
        delattr(config, RECORD)
    return config, family_of(config), record


def _prepared_model(cfg: PlanConfig, config, family):
    """The model on the meta device, in the dtype its run loads it in (serving in bf16, and GPUs: bf16
    with bf16 and for QLoRA, whose base is bf16 before it is quantized, else fp32; a CPU's training:
    its config's), prepared as the training stage prepares it: gradient checkpointing, then the
    fine-tuning method."""
    from huayu.models.loading import remote_code_trusted
    from huayu.train.methods import apply_finetuning

    dtype = {}
    if (cfg.inference or cfg.gpus) and _bf16_compute(cfg):
        dtype = {"dtype": torch.bfloat16}
    elif cfg.gpus:
        dtype = {"dtype": torch.float32}
    with torch.device("meta"):  # peft adapts a model on the meta device as it does a real one
        model = family.auto().from_config(config, **dtype, trust_remote_code=remote_code_trusted())
    if cfg.inference:
        return model
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise HuayuError(f"--gradient-checkpointing: {config.model_type} models do not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.finetuning.uses_adapter:  # lets the adapters' gradients through the frozen, checkpointed base
            model.enable_input_require_grads()
    return apply_finetuning(model, cfg.finetuning)


def _gpu_dtypes(model, cfg: PlanConfig) -> set[int]:
    """The ids of the weights bitsandbytes quantizes (every frozen linear layer's but the output head's:
    the step computes with their bf16 stand-ins); the rest set to a GPU run's dtypes: fp32 master
    weights for what trains (unless --pure-bf16), and with QLoRA fp32 for all that stays unquantized,
    as peft's prepare_model_for_kbit_training makes it."""
    from huayu.models.families import linear_types

    quantized = set()
    if cfg.quantization_bit:
        head = model.get_output_embeddings()
        quantized = {id(m.weight) for m in model.modules() if isinstance(m, linear_types()) and m is not head
                     and (cfg.inference or not m.weight.requires_grad)}
    if not cfg.inference:
        for p in model.parameters():
            if id(p) not in quantized and (cfg.quantization_bit or (p.requires_grad and not cfg.pure_bf16)):
                p.data = p.data.float()
    return quantized


@dataclass
class Measured:
    """The prepared model (on fake tensors) and the bytes of its training step (the last that
    `_train_steps` takes), or of its forward when serving."""
    model: torch.nn.Module
    quantized: set[int]
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    kept: int        # what the forward leaves alive besides weights and optimiser state (kept for backward)
    transient: int   # the most alive besides weights, gradients and optimiser state in forward and backward
    stepping: int    # the optimiser step's own temporaries
    peak: int        # the most alive at all


def _measure(cfg: PlanConfig, config, family, record) -> Measured:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from huayu.models.loading import count_parameters
    from huayu.quantization import quantize_model

    model = _prepared_model(cfg, config, family)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_cpu_tensors(model, mode)
    with mode:
        quantized = _gpu_dtypes(model, cfg) if cfg.gpus else set()
    trainable, total = count_parameters(model)  # before quantization turns weights into buffers
    if record or cfg.bits in (8, 4):
        with mode:
            quantize_model(model, record["bits"] if record else cfg.bits,
                           (record["group_size"] or 32) if record else 32)
    batch = _batch(cfg, family)
    memory = LiveTensorBytes()
    weights = memory.hold(*model.parameters(), *model.buffers())
    memory.restart_transient()
    with mode, memory:
        if cfg.inference:
            model.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' own renaming of the cache argument
                output = model(**batch, use_cache=True)
            optimizer, kept, transient, stepping = 0, memory.live - weights, memory.transient_peak, 0
            del output
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16_compute(cfg))
            optimizer, kept, transient, stepping = _train_steps(model, batch, family, memory, autocast,
                                                                gpu=bool(cfg.gpus))
    gradients = 0 if cfg.inference else sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Measured(model, quantized, total, trainable, weights, gradients, optimizer, kept, transient, stepping,
                    memory.peak)


def _train_steps(model, batch, family, memory, autocast, gpu: bool) -> tuple[int, int, int, int]:
    """Training steps as a CPU or a GPU run takes them (torch's AdamW: its per-tensor loop on CPUs, its
    foreach implementation on CUDA): two for a CPU, whose peak RSS comes with the second, the optimiser's
    state alive; one for a GPU plan, which sums parts that the first shows. The last step's optimiser
    state, what its forward keeps for backward, the most alive besides the settled weights, gradients and
    state in its forward and backward, and its optimiser step's temporaries."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.register_post_accumulate_grad_hook(lambda param: memory.settle(param.grad))
    optimizer = torch.optim.AdamW(trainable, foreach=gpu)
    state_bytes = 0
    for _ in range(1 if gpu else 2):
        memory.restart_transient()
        with autocast:
            loss = _loss(model, batch, family)
        kept = memory.live - memory.settled
        loss.backward()
        transient = memory.transient_peak
        before = memory.restart_transient()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        previous, state_bytes = state_bytes, sum(t.untyped_storage().nbytes() for t in state)
        stepping = memory.transient_peak - before - (state_bytes - previous)  # less the state it made
        memory.settle(*state)
        del loss
    return state_bytes, kept, transient, stepping


def estimate(cfg: PlanConfig) -> Estimate:
    """A CPU process's plan: its tensors by kind and its peak RSS."""
    config, family, record = _setup(cfg)
    baseline = _baseline()
    m = _measure(cfg, config, family, record)
    transient = m.peak - m.weights - m.optimizer
    factor = 1.0 if "MALLOC_MMAP_THRESHOLD_" in os.environ else CPU_ALLOCATOR_FACTOR
    process = baseline + m.weights + m.optimizer + round(factor * transient) + CPU_FIXED_OVERHEAD
    bits = record["bits"] if record else (16 if _bf16(cfg) else cfg.bits)
    precision = {32: ", fp32", 16: ", bf16" if cfg.inference else ", fp32 weights with bf16 autocast",
                 8: ", int8 weights", 4: ", int4 weights"}[bits]
    notes = [] if cfg.inference else ["per process: data-parallel processes each hold all of it; --grad-accum "
                                      "changes nothing here"]
    return Estimate(cfg.model, type(m.model).__name__, _what(cfg, family) + precision, m.parameters, m.trainable,
                    m.weights, m.gradients, m.optimizer, m.kept, transient - m.kept, m.peak, baseline, process, notes)


def plan_gpus(cfg: PlanConfig) -> GpuEstimate:
    """A GPU run's plan: its memory per GPU by component, and the cards it fits."""
    config, family, record = _setup(cfg)
    m = _measure(cfg, config, family, record)
    weights_by_dtype: dict[str, int] = {}
    for tensor in {id(t): t for t in [*m.model.parameters(), *m.model.buffers()]}.values():
        kind, size = _on_device(tensor, m.quantized, cfg.quantization_bit)
        weights_by_dtype[kind] = weights_by_dtype.get(kind, 0) + size
    split = cfg.gpus if cfg.sharding == "fsdp" else 1
    weights = sum(weights_by_dtype.values()) // split
    gradients = m.gradients * (2 if cfg.sharding == "ddp" else 1) // split
    optimizer, stepping = m.optimizer // split, m.stepping // split
    gathered, uncached = _fsdp(m, cfg) if cfg.sharding == "fsdp" else (0, 0)
    activations = m.transient - uncached
    per_gpu = weights + gradients + optimizer + max(activations + gathered, stepping) + CUDA_OVERHEAD
    devices = f"; {cfg.gpus} GPU" + "s" * (cfg.gpus > 1) + f", {cfg.sharding}" * (cfg.sharding != "none")
    return GpuEstimate(cfg.model, type(m.model).__name__, _what(cfg, family) + _gpu_precision(cfg) + devices,
                       m.parameters, m.trainable, cfg.gpus, cfg.sharding, weights, weights_by_dtype, gradients,
                       optimizer, activations, stepping, gathered, CUDA_OVERHEAD, per_gpu,
                       {f"{gb} GB": per_gpu <= gb * GiB for gb in CARDS_GB})


def _what(cfg: PlanConfig, family) -> str:
    if cfg.inference:
        return f"inference: one forward over {cfg.batch} x {cfg.seq_len} prompt tokens with its KV cache"
    return (f"{cfg.finetuning.finetuning_type} fine-tuning step, {cfg.batch} x {cfg.seq_len} tokens"
            + (f" -> {cfg.target_len or cfg.seq_len} target tokens" if family.seq2seq else "")
            + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))


def _gpu_precision(cfg: PlanConfig) -> str:
    if cfg.quantization_bit:
        return f", {QUANTIZED_NAMES[cfg.quantization_bit]} base (QLoRA), bf16 compute"
    if cfg.pure_bf16:
        return ", bf16 weights, gradients and AdamW state"
    if _bf16(cfg):
        return ", bf16" + ("" if cfg.inference else " autocast, frozen weights bf16, trained ones fp32 (masters)")
    return ", fp32"


def _on_device(tensor, quantized: set[int], bits: int | None) -> tuple[str, int]:
    """What a GPU stores for `tensor`: its kind and bytes (bitsandbytes' for a quantized weight)."""
    if id(tensor) in quantized:
        return QUANTIZED_NAMES[bits], round(tensor.numel() * QUANTIZED_BYTES[bits])
    kind = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
    return kind, tensor.untyped_storage().nbytes()


def _fsdp(m: Measured, cfg: PlanConfig) -> tuple[int, int]:
    """What FSDP (a unit per transformer layer; with bf16, MixedPrecision gathering in bf16) holds that
    one GPU's run does not, and what it does not hold that one GPU's run does. It holds unsharded at
    once the root unit (all outside the layers: embeddings, head, final norm), gathered from forward to
    backward, two layers (the one computing and the next, prefetched) and one layer's gradients before
    their reduce-scatter. It does not hold autocast's cached bf16 copies of the trained weights: the
    gathered units are bf16 already."""
    from huayu.models.families import layer_stacks, linear_types

    bf16 = _bf16_compute(cfg)

    def gathered(params) -> int:
        return sum(_on_device(p, m.quantized, cfg.quantization_bit)[1] if id(p) in m.quantized or not bf16
                   else 2 * p.numel() for p in params)

    layers = [layer for _, stack in layer_stacks(m.model) for layer in stack]
    inside = {id(p) for layer in layers for p in layer.parameters()}
    largest = max(layers, key=lambda layer: gathered(layer.parameters()))
    held = (gathered(p for p in m.model.parameters() if id(p) not in inside) + 2 * gathered(largest.parameters())
            + gathered(p for p in largest.parameters() if p.requires_grad))
    cached = sum(2 * module.weight.numel() for module in m.model.modules() if isinstance(module, linear_types())
                 and module.weight.requires_grad and module.weight.dtype == torch.float32) if bf16 else 0
    return held, cached


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


def render_gpus(est: GpuEstimate) -> str:
    def gib(n: int) -> str:
        return f"{n / GiB:>8,.2f} GiB"

    training = "inference" not in est.what
    share = 100 * est.trainable / max(est.parameters, 1)
    dtypes = ", ".join(f"{kind} {n / GiB:,.2f}"
                       for kind, n in sorted(est.weights_by_dtype.items(), key=lambda item: -item[1]))
    split = f" / {est.gpus}" if est.sharding == "fsdp" else ""
    rows = [f"{est.model} ({est.architecture}): {est.what}",
            f"parameters {est.parameters:,}" + (f", trainable {est.trainable:,} ({share:.2f}%)" if training else ""),
            "  per GPU",
            f"  weights               {gib(est.weights)}   (GiB by dtype: {dtypes}{split})"]
    if training:
        rows += [f"  gradients             {gib(est.gradients)}   (of the trained weights, in their dtype"
                 + ("; and DDP's all-reduce buckets, a second copy" if est.sharding == "ddp" else "") + ")",
                 f"  optimiser state       {gib(est.optimizer)}   (AdamW: two moments per trained weight)",
                 f"  activations           {gib(est.activations)}   (kept for backward, and backward's temporaries)",
                 f"  optimiser step        {gib(est.optimizer_step)}   (foreach AdamW's temporaries; never live with "
                 "the activations)"]
    else:
        rows += [f"  activations           {gib(est.activations)}   (the KV cache, the logits, temporaries)"]
    if est.sharding == "fsdp":
        rows += [f"  FSDP gathered         {gib(est.fsdp_gathered)}   (the root unit, two layers' weights, one "
                 "layer's gradients)"]
    rows += [f"  CUDA and framework    {gib(est.cuda_overhead)}   (context, workspaces, allocator reserve: "
             "an allowance)",
             f"  peak per GPU          {gib(est.per_gpu)}",
             "fits on " + ", ".join(f"{card}: {'yes' if ok else 'no'}" for card, ok in est.fits.items())]
    return "\n".join(rows)


def add_arguments(parser) -> None:
    import argparse

    add_config_arguments(parser, PlanConfig)
    parser.add_argument("--model", dest="model", default=argparse.SUPPRESS, help="MODEL, as training commands take it")


def run(args) -> None:
    from dataclasses import asdict

    cfg = config_from_args(PlanConfig, args)
    est = plan_gpus(cfg) if cfg.gpus else estimate(cfg)
    print(json.dumps(asdict(est), indent=2) if cfg.json else (render_gpus if cfg.gpus else render)(est))
