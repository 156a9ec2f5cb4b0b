"""Data-parallel training (DDP) over several processes, when `torchrun` launches the command.

torchrun (and `accelerate launch --multi_gpu`, which runs torchrun) gives every process RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With WORLD_SIZE > 1 `session()` joins the
processes in a gloo group (the loop trains on CPU, so its tensors are CPU tensors: gloo, not nccl),
and the loop runs the model through DistributedDataParallel, which starts every rank from rank 0's
weights and averages gradients. Without those variables every function here is the single-process
identity, so a plain run does exactly what it did before.

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
    for variable, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise HuayuError(f"{what} was requested (accelerate config), but huayu's training loop does plain DDP "
                             "on CPU: launch with torchrun (see docs/distributed.md)")
    mpi_size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if mpi_size and int(mpi_size) > 1 and "WORLD_SIZE" not in os.environ:
        raise HuayuError(f"launched by mpirun ({mpi_size} processes): huayu reads torchrun's RANK/WORLD_SIZE, so each "
                         "process would train alone into the same --out; launch with torchrun")
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        print("note: MASTER_ADDR is set but WORLD_SIZE is not, so this is one process: `accelerate launch --cpu` "
              "starts a single process; use `torchrun --nproc-per-node N` for several (docs/distributed.md)",
              file=sys.stderr)


@contextmanager
def session():
    """The process group of a torchrun launch for the duration of a command (inside one already
    joined: that one). Ranks other than 0 keep quiet on stdout (their errors still reach stderr),
    so lines are printed once."""
    _check_launch()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull) if not is_main() else nullcontext():
            yield
    finally:
        gc.collect()  # DDP's reducer, kept alive by reference cycles, must go before its group (else: abort at exit)
        torch.distributed.destroy_process_group()


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
    torch.distributed.all_reduce(values)
    n = world_size()
    mean_part, sum_part = values[:len(means)] / n, values[len(means):]
    return dict(zip(means, mean_part.tolist())), {k: int(v) for k, v in zip(sums, sum_part.tolist())}


def shard(chunk: torch.Tensor) -> list[int]:
    """This rank's consecutive share of a global micro-batch of example indices (sizes differ by
    at most one; `chunk` has at least one index per rank)."""
    return chunk.tensor_split(world_size())[rank()].tolist()


class _LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP syncs gradients of what its forward
    computes, and some losses reach the model's parts directly (mlm_loss calls its heads)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


class DataParallel:
    """A batch's (loss, parts) by `loss_fn`, through DistributedDataParallel when several
    processes train. `accumulating(True)` skips the gradient all-reduce of a micro-batch that is
    not the step's last (gradients then add up locally and are averaged once)."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        # find_unused_parameters: some trainable weights take no part in some losses (BERT's pooler without SOP)
        self.ddp = torch.nn.parallel.DistributedDataParallel(_LossModule(model, loss_fn), find_unused_parameters=True) \
            if world_size() > 1 else None

    def __call__(self, batch: dict):
        return self.ddp(batch) if self.ddp is not None else self.loss_fn(self.model, batch)

    def accumulating(self, skip_sync: bool):
        return self.ddp.no_sync() if self.ddp is not None and skip_sync else nullcontext()
