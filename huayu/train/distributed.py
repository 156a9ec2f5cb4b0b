"""Where the one loop trains: the device, mixed precision and data parallelism, through accelerate.

`accelerator()` gives the loop an `accelerate.Accelerator` for `--device` (auto: CUDA when there is
one) and `--bf16` / `--fp16`. Launched by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE, ...),
`session()` joins the processes through accelerate's PartialState (gloo on CPU, NCCL on GPUs) and the
accelerator wraps the model in DistributedDataParallel, which starts every rank from rank 0's
weights and averages gradients. Without those variables every function here is the single-process
identity. With `--fsdp` (or an accelerate FSDP config) torch's FSDP2 shards the model instead, and with an
accelerate DeepSpeed config (or `--deepspeed FILE`) DeepSpeed's ZeRO does: huayu/train/parallel.py.

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
from pathlib import Path

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
    """Launches the loop would get silently wrong are errors (FSDP with DeepSpeed, mpirun); accelerate's
    single-process CPU trap is a note."""
    if deepspeed_requested() and fsdp_requested(False):
        raise HuayuError("both FSDP and DeepSpeed were requested: choose one")
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


def tell_deepspeed(device: str) -> None:
    """DeepSpeed (imported by accelerate and transformers whenever it is installed) warns on stdout
    each time it finds no GPU: on the CPU, say so first."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def session(device: str = "auto"):
    """The process group of a torchrun / accelerate launch for the duration of a command (inside
    one already joined: that one). Ranks other than 0 keep quiet on stdout (their errors still
    reach stderr), so lines are printed once."""
    from accelerate import PartialState

    _check_launch()
    tell_deepspeed(resolve_device(device))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    # DeepSpeed joins the processes itself (its CPU build too): accelerate must not take the CPU path
    PartialState(cpu=resolve_device(device) == "cpu" and not deepspeed_requested(), timeout=WAIT_TIMEOUT)
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


def fsdp_requested(flag: bool) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (which says so in the environment)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config, or --deepspeed FILE (which sets the same variables)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def request_deepspeed(config_file: str) -> None:
    """--deepspeed FILE under torchrun: the environment `accelerate launch` would have set."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise HuayuError("--deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' (docs/distributed.md)")
    if not Path(config_file).is_file():
        raise HuayuError(f"--deepspeed: no DeepSpeed config file '{config_file}'")
    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config_file))


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
    tell_deepspeed(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    AcceleratorState._reset_state()  # one process may train several times (a recipe), each with its own precision
    precision = "bf16" if bf16 else "fp16" if fp16 else "no"
    if deepspeed_requested():  # its plugin comes from the environment; DeepSpeed places the model itself
        return Accelerator(mixed_precision=precision)
    fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)  # huayu shards the model itself (huayu/train/parallel.py)
    try:
        # find_unused_parameters: some trainable weights take no part in some losses (BERT's pooler without SOP)
        return Accelerator(cpu=device == "cpu", mixed_precision=precision,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    finally:
        if fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp
