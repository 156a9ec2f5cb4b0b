"""Where the model's state lives across the processes, and how checkpoints hold it.

Three layouts, one interface for the loop (huayu/train/loop.py):

- `Replicated`: one process, or DDP: every rank holds the whole model and optimiser; checkpoints are
  whole (safetensors model + trainer state) and resume under any number of processes.
- `FullyShardedFSDP2`: torch's FSDP2 splits parameters, gradients and optimiser state over the
  processes, one unit per decoder layer. A checkpoint is sharded: each rank writes its own part
  (`shards/rank-R-of-N.safetensors` + `.json`, no pickle), so no rank ever holds the whole optimiser
  state; it resumes under the same number of processes.
- `DeepSpeedZeRO`: DeepSpeed's ZeRO-2 (optimiser state and gradients sharded) or ZeRO-3 (parameters
  too) through accelerate. Its checkpoints are DeepSpeed's own, which are pickles: resuming one
  needs --allow-pickle-weights, since loading it could run code (docs/reliability.md).

The final model (and the best one) is always whole: gathered to rank 0 and saved as safetensors
that plain transformers loads.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from huayu.errors import HuayuError
from huayu.train import distributed
from huayu.train.state import STATE_JSON, load_state, save_state

SHARDS = "shards"
DEEPSPEED_TAG = "deepspeed"


class LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP and DeepSpeed sync gradients of what their
    forward computes, and some losses reach the model's parts directly (mlm_loss calls its heads)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    @property
    def config(self):  # accelerate sizes DeepSpeed's "auto" buckets from the model's hidden size
        return self.model.config

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


class Replicated:
    """One process or DDP: the whole model on every rank."""

    kind = "replicated"
    everyone_validates = False  # rank 0 validates alone; the others wait for its metrics
    weights_in_checkpoint = True  # the checkpoint's model loads with from_pretrained

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def prepare(self, model, loss_fn, optimizer_for):
        """The wrapped loss module and the optimiser, ready to train."""
        self.model = model
        self.wrapped, self.optimizer = self.accelerator.prepare(LossModule(model, loss_fn), optimizer_for(model))
        return self.wrapped, self.optimizer

    def accumulating(self, last: bool):
        """The context of one micro-batch's backward: gradients sync only at the last of a step."""
        return nullcontext() if last else self.accelerator.no_sync(self.wrapped)

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def whole_weights(self) -> dict | None:
        """The model's state gathered on rank 0's CPU (every rank calls this); None: the model on
        rank 0 is whole and saves its own."""
        return None

    def record(self) -> dict:
        """What a checkpoint says about the layout it was written in."""
        return {"kind": self.kind, "processes": distributed.world_size()}

    def save(self, directory: Path) -> dict:
        """Write this rank's part of the training state into `directory` (every rank calls this);
        return what goes into rank 0's trainer state."""
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, directory: Path, state: dict) -> None:
        """Put a checkpoint's training state back (every rank), model weights included unless
        `weights_in_checkpoint` (then they were loaded with the model)."""
        self.optimizer.load_state_dict(state["optimizer"])

    def check_resumable(self, saved: dict, directory: Path) -> None:
        if saved["kind"] != self.kind:
            raise HuayuError(f"--resume: {directory} was written under {describe(saved)}; this run is "
                             f"{describe(self.record())}: resume it the way it was started")


class FullyShardedFSDP2(Replicated):
    """FSDP2 over every process: each decoder layer (the model's `_no_split_modules` classes, or
    accelerate's FSDP_TRANSFORMER_CLS_TO_WRAP) is a unit whose parameters are gathered just for its
    forward and backward, then the rest of the model; bf16 computes in bf16, reduces in fp32."""

    kind = "fsdp"
    everyone_validates = True  # a sharded forward needs every rank
    weights_in_checkpoint = False

    def __init__(self, accelerator, bf16: bool):
        super().__init__(accelerator)
        self.bf16 = bf16

    def prepare(self, model, loss_fn, optimizer_for):
        self.model = model
        self._shard(model)  # replaces the parameters by shards: the optimiser must be made after it
        self.wrapped, self.optimizer = LossModule(model, loss_fn), self.accelerator.prepare(optimizer_for(model))
        return self.wrapped, self.optimizer

    def _shard(self, model) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        names = {n.strip() for n in names.split(",") if n.strip()} or \
            set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise HuayuError(f"--fsdp: no decoder layers to shard by in {type(model).__name__} (looked for "
                             f"{', '.join(sorted(names)) or 'its _no_split_modules'}): set "
                             "fsdp_transformer_layer_cls_to_wrap")
        kinds = sorted({type(m).__name__ for m in layers})  # before fully_shard renames their classes
        device = self.accelerator.device
        model.to(device)
        mesh = init_device_mesh(torch.device(device).type, (distributed.world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else \
            MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        print(f"FSDP: parameters, gradients and optimiser state sharded over {distributed.world_size()} processes, "
              f"{len(layers)} units ({', '.join(kinds)})")

    def accumulating(self, last: bool):
        return self.accelerator.no_sync(self.wrapped) if not last else nullcontext()

    def whole_weights(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _sharded_state(self) -> dict:
        """This rank's model and optimiser state, as DTensors (the optimiser's made if not yet)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def save(self, directory: Path) -> dict:
        local = _map_tensors(self._sharded_state(), _local_part)
        (directory / SHARDS).mkdir(exist_ok=True)
        save_state(directory / SHARDS, local, name=_shard_name())
        return {}

    def load(self, directory: Path, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        saved = load_state(directory / SHARDS, name=_shard_name())
        template = self._sharded_state()
        whole = {part: _fill(template[part], saved[part], f"{directory}: {part}") for part in template}
        set_model_state_dict(self.model, whole["model"])
        set_optimizer_state_dict(self.model, self.optimizer, whole["optimizer"])

    def check_resumable(self, saved: dict, directory: Path) -> None:
        super().check_resumable(saved, directory)
        if saved["processes"] != distributed.world_size():
            raise HuayuError(f"--resume: {directory} is sharded over {saved['processes']} processes and this run "
                             f"has {distributed.world_size()}: resume with {saved['processes']}")


class DeepSpeedZeRO(Replicated):
    """DeepSpeed's engine through accelerate. huayu keeps the loop: it owns the batch size, the
    accumulation (it sets the boundary and weights each micro-batch itself, so DeepSpeed must not
    rescale), the clipping norm, the precision, the optimiser and the schedule; the config file
    says how to shard (zero_optimization) and nothing that contradicts those flags."""

    kind = "deepspeed"
    weights_in_checkpoint = False

    def __init__(self, accelerator, args):
        super().__init__(accelerator)
        self.config = accelerator.state.deepspeed_plugin.deepspeed_config
        self._own_config(args)
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.everyone_validates = self.stage == 3
        print(f"DeepSpeed ZeRO-{self.stage} over {distributed.world_size()} processes")

    def _own_config(self, args) -> None:
        owned = {"train_micro_batch_size_per_gpu": (args.batch_size, "--batch-size"),
                 "gradient_accumulation_steps": (args.grad_accum, "--grad-accum"),
                 "train_batch_size": (args.batch_size * args.grad_accum * distributed.world_size(),
                                      "--batch-size x --grad-accum x processes"),
                 "gradient_clipping": (args.max_grad_norm, "--max-grad-norm")}
        for key, (value, flag) in owned.items():
            given = self.config.get(key, "auto")
            if given != "auto" and given != value:
                raise HuayuError(f"the DeepSpeed config sets {key} {given}, but huayu's {flag} makes it {value}: "
                                 f"set it to \"auto\" (or leave it out) and use {flag}")
            self.config[key] = value
        for section in ("optimizer", "scheduler"):
            if section in self.config:
                raise HuayuError(f"the DeepSpeed config has a '{section}' section: huayu's loop owns the optimiser "
                                 "and the schedule (--lr, --schedule, ...); remove it")
        zero = self.config.setdefault("zero_optimization", {})
        if int(zero.get("stage", 0)) == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # the final model is saved whole

    def accumulating(self, last: bool):
        # the engine steps (clipping included) at the boundary accelerate tells it of
        self.accelerator.gradient_state._set_sync_gradients(last)
        return nullcontext()

    def backward(self, loss) -> None:
        self.accelerator.backward(loss, scale_wrt_gas=False)  # the loop weighted each micro-batch already

    def whole_weights(self) -> dict | None:
        if self.stage < 3:
            return None
        state = self.accelerator.get_state_dict(self.wrapped)
        return None if state is None else {k.removeprefix("model."): v for k, v in state.items()}

    def save(self, directory: Path) -> dict:
        self.wrapped.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        return {}

    def load(self, directory: Path, state: dict) -> None:
        from huayu.models.loading import ALLOW_PICKLE_FLAG, pickle_weights_allowed

        if not pickle_weights_allowed():
            raise HuayuError(f"--resume: {directory} is a DeepSpeed checkpoint, whose files are pickles (loading "
                             f"them can run code): pass {ALLOW_PICKLE_FLAG} to resume a checkpoint you trust")
        path, _ = self.wrapped.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise HuayuError(f"--resume: {directory} has no DeepSpeed state ({DEEPSPEED_TAG}/)")

    def check_resumable(self, saved: dict, directory: Path) -> None:
        super().check_resumable(saved, directory)
        if saved.get("stage") != self.stage:
            raise HuayuError(f"--resume: {directory} was written by ZeRO-{saved.get('stage')}, this run is "
                             f"ZeRO-{self.stage}: resume with the same DeepSpeed config")

    def record(self) -> dict:
        return {**super().record(), "stage": self.stage}


def describe(record: dict) -> str:
    kind = {"replicated": "one process or DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}[record["kind"]]
    return f"{kind} ({record['processes']} processes)" if record["kind"] != "replicated" else kind


def layout(accelerator, args):
    """The layout this run trains in: DeepSpeed when accelerate is configured for it, FSDP with
    --fsdp (or an accelerate FSDP config) over several processes, else replicated."""
    if distributed.deepspeed_requested():
        return DeepSpeedZeRO(accelerator, args)
    if distributed.fsdp_requested(args.fsdp) and distributed.world_size() > 1:
        return FullyShardedFSDP2(accelerator, args.bf16)
    return Replicated(accelerator)


def checkpoint_layout(directory: Path) -> dict:
    """The layout a checkpoint was written in (older checkpoints, and those whose state is missing,
    which resuming then refuses: replicated)."""
    path = Path(directory) / STATE_JSON
    state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return state.get("layout") or {"kind": "replicated", "processes": 1}


def _shard_name() -> str:
    return f"rank-{distributed.rank():05d}-of-{distributed.world_size():05d}"


def _local_part(value):
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _map_tensors(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return fn(tree) if isinstance(tree, torch.Tensor) else tree


def _fill(template, saved, where: str):
    """`template` (this rank's state as DTensors) with the values of `saved` (their local parts, as
    written), each put back as a DTensor of the template's placement."""
    from torch.distributed.tensor import DTensor

    if isinstance(template, dict):
        if set(template) != set(saved):
            raise HuayuError(f"{where} does not match this model (keys differ, e.g. "
                             f"{sorted(set(template) ^ set(saved))[:3]})")
        return {k: _fill(template[k], saved[k], f"{where}.{k}") for k in template}
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, s, where) for t, s in zip(template, saved))
    if isinstance(template, DTensor):
        local = saved.to(template.to_local().device, template.dtype)
        if local.shape != template.to_local().shape:
            raise HuayuError(f"{where}: shard of shape {tuple(local.shape)}, this rank holds "
                             f"{tuple(template.to_local().shape)}")
        return DTensor.from_local(local, template.device_mesh, template.placements, shape=template.shape,
                                  stride=template.stride())
    if isinstance(template, torch.Tensor):
        return saved.to(template.device)
    return saved
