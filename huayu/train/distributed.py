"""Where the one loop trains: the device, mixed precision and data parallelism, through accelerate.

`accelerator()` gives the loop an `accelerate.Accelerator` for `--device` (auto: CUDA when there is
one) and `--bf16` / `--fp16`. Launched by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE, ...),
`session()` joins the processes through accelerate's PartialState (gloo on CPU, NCCL on GPUs) and the
accelerator wraps the model in DistributedDataParallel, which starts every rank from rank 0's
weights and averages gradients. Without those variables every function here is the single-process
identity. With `--fsdp` (or an accelerate FSDP config) `shard_model()` splits parameters, gradients and
optimiser state over the processes with torch's FSDP2 instead (full shard, one unit per decoder
layer); checkpoints gather them into whole ones, which resume under any number of processes and
load with plain transformers. (DeepSpeed launches are refused: see docs/distributed.md.)

`--batch-size` is per process (the Hugging Face / LLaMA-Factory convention): an optimiser step
sees batch_size x world size x grad_accum examples. Only rank 0 writes files (outputs, logs,
checkpoints); the others wait for it at barriers.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager, nullcontext, redirect_stdout
from datetime import timedelta

import torch

from huayu.errors import HuayuError

# Rank 0 tokenizes (and caches) the data while the others wait: allow more than torch's default 30 min.
WAIT_TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is the one that writes files and prints."""
    return rank() == 0


def _check_launch() -> None:
    """Launches the loop would get silently wrong are errors (FSDP/DeepSpeed configs, mpirun); accelerate's
    single-process CPU trap is a note."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise HuayuError("DeepSpeed was requested (accelerate config), but huayu's loop does not run DeepSpeed's "
                         "engine yet: shard with FSDP instead (examples/accelerate/fsdp.yaml, docs/distributed.md)")
    mpi_size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if mpi_size and int(mpi_size) > 1 and "WORLD_SIZE" not in os.environ:
        raise HuayuError(f"launched by mpirun ({mpi_size} processes): huayu reads torchrun's RANK/WORLD_SIZE, so each "
                         "process would train alone into the same --out; launch with torchrun")
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        print("note: MASTER_ADDR is set but WORLD_SIZE is not, so this is one process: `accelerate launch --cpu` "
              "starts a single process; use `torchrun --nproc-per-node N` for several (docs/distributed.md)",
              file=sys.stderr)


def resolve_device(device: str) -> str:
    """`--device`: auto is CUDA when there is one, else the CPU; cuda without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise HuayuError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise HuayuError("--device cuda, but torch sees no CUDA GPU (a CPU build of torch, or no driver): "
                         "install torch for CUDA (README, GPUs) or train with --device cpu")
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def session(device: str = "auto"):
    """The process group of a torchrun / accelerate launch for the duration of a command (inside
    one already joined: that one). Ranks other than 0 keep quiet on stdout (their errors still
    reach stderr), so lines are printed once."""
    from accelerate import PartialState

    _check_launch()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    PartialState(cpu=resolve_device(device) == "cpu", timeout=WAIT_TIMEOUT)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull) if not is_main() else nullcontext():
            yield
    finally:
        gc.collect()  # DDP's reducer, kept alive by reference cycles, must go before its group (else: abort at exit)
        torch.distributed.destroy_process_group()
        PartialState._reset_state()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first, the others after it: rank 0 fills the data cache, they read it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def gather(value) -> list:
    """Every rank's `value` (a picklable object), in rank order, on every rank."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def from_main(value):
    """Rank 0's `value` on every rank (e.g. the validation metrics only rank 0 computed)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reduce(means: dict[str, float], sums: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """`means` averaged and `sums` added over the ranks (one all-reduce), so a logged loss and
    token count describe the global batch. Every rank must pass the same keys."""
    if not torch.distributed.is_initialized():
        return means, sums
    values = torch.tensor([*means.values(), *sums.values()], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        values = values.cuda()
    torch.distributed.all_reduce(values)
    values = values.cpu()
    mean_part, sum_part = values[:len(means)] / world_size(), values[len(means):]
    return dict(zip(means, mean_part.tolist())), dict(zip(sums, sum_part.tolist()))


def shard(chunk: torch.Tensor) -> list[int]:
    """This rank's consecutive share of a global micro-batch of example indices (sizes differ by
    at most one; `chunk` has at least one index per rank)."""
    return chunk.tensor_split(world_size())[rank()].tolist()


class LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP syncs gradients of what its forward
    computes, and some losses reach the model's parts directly (mlm_loss calls its heads)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def fsdp_requested(flag: bool) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (which says so in the environment)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def shard_model(model, device, bf16: bool) -> None:
    """FSDP2 over every process: each decoder layer (the model's `_no_split_modules` classes, or
    accelerate's FSDP_TRANSFORMER_CLS_TO_WRAP) is a unit whose parameters are gathered just for its
    forward and backward, then the rest of the model; bf16 computes in bf16, reduces in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    names = {n.strip() for n in names.split(",") if n.strip()} or set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise HuayuError(f"--fsdp: no decoder layers to shard by in {type(model).__name__} (looked for "
                         f"{', '.join(sorted(names)) or 'its _no_split_modules'}): set "
                         "fsdp_transformer_layer_cls_to_wrap")
    kinds = sorted({type(m).__name__ for m in layers})  # before fully_shard renames their classes
    model.to(device)
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    print(f"FSDP: parameters, gradients and optimiser state sharded over {world_size()} processes, "
          f"{len(layers)} units ({', '.join(kinds)})")


def whole_model_state(model, sharded: bool) -> dict | None:
    """The model's state gathered from the ranks' shards, on rank 0's CPU (every rank must call
    this); None unsharded: the model saves its own."""
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_optimizer_state(model, optimizer, sharded: bool) -> dict:
    """The optimiser's state with whole tensors (sharded: gathered to rank 0; every rank calls)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """A whole optimiser state (whole_optimizer_state) put back: sharded, each rank keeps its part."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def check_precision(device: str, bf16: bool, fp16: bool) -> str:
    """The device `--device` resolves to, once the precision flags are known to suit it."""
    device = resolve_device(device)
    if bf16 and fp16:
        raise HuayuError("--bf16 and --fp16 exclude each other")
    if fp16 and device == "cpu":
        raise HuayuError("--fp16 is for GPUs: on a CPU fp16 matmuls are hundreds of times slower; use --bf16")
    return device


def accelerator(device: str, bf16: bool, fp16: bool):
    """An Accelerator for `--device` and mixed precision: bf16 autocast, or fp16 autocast with loss
    scaling (for V100 / T4; never on the CPU, where fp16 matmuls crawl); TF32 matmuls on CUDA."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    device = check_precision(device, bf16, fp16)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    AcceleratorState._reset_state()  # one process may train several times (a recipe), each with its own precision
    fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)  # huayu shards the model itself (shard_model)
    try:
        # find_unused_parameters: some trainable weights take no part in some losses (BERT's pooler without SOP)
        return Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "fp16" if fp16 else "no",
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    finally:
        if fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp
