"""The trainer state of a checkpoint (step, optimiser, schedule, random streams) without pickle.

A checkpoint is something a user downloads, shares or finds on a shared disk: loading it must not
run code. `torch.load` unpickles (and its `weights_only` mode has had bypasses in the torch
versions huayu supports), so the state is split instead: every tensor into a safetensors file,
everything else into JSON, with tuples, non-string dict keys and tensors marked so that the
structure comes back exactly — and exact resume stays exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from huayu.errors import HuayuError

STATE = "trainer_state"
STATE_JSON = f"{STATE}.json"
LEGACY_PICKLE = "trainer_state.pt"  # what huayu wrote before: refused, since loading it could run code


def _flatten(value, tensors: dict):
    """JSON-able `value`, its tensors moved into `tensors` under the keys left in their place."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_flatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _flatten(v, tensors) for k, v in value.items()}
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the trainer state")


def _restore(value, tensors: dict):
    if isinstance(value, list):
        return [_restore(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_restore(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {_restore(k, tensors): _restore(v, tensors) for k, v in value["__items__"]}
        return {k: _restore(v, tensors) for k, v in value.items()}
    return value


def save_state(directory: Path, state: dict, name: str = STATE) -> None:
    """Write `state` as NAME.safetensors + NAME.json into `directory` (the JSON last: it marks a
    complete state)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _flatten(state, tensors)
    storages: set[int] = set()
    for key, tensor in tensors.items():  # tied weights share storage, which safetensors refuses
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensors[key] = tensor.clone()
        storages.add(storage)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    tmp = directory / f".tmp-{name}.json"
    tmp.write_text(json.dumps(tree), encoding="utf-8")
    os.replace(tmp, directory / f"{name}.json")


def has_state(directory: Path) -> bool:
    return (directory / STATE_JSON).exists()


def load_state(directory: Path, name: str = STATE) -> dict:
    """The state saved by save_state; reading it runs no code whatever the files hold."""
    from safetensors.torch import load_file

    if not (directory / f"{name}.json").exists():
        if (directory / LEGACY_PICKLE).exists():
            raise HuayuError(f"{directory} holds a trainer state written by an older huayu as a pickle "
                             f"({LEGACY_PICKLE}), which huayu no longer loads since loading it could run code: "
                             "resume is not possible from it; start the run anew (or continue from its weights "
                             "with --model)")
        raise HuayuError(f"{directory} has no {name}.json")
    try:
        tree = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        return _restore(tree, load_file(str(directory / f"{name}.safetensors")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HuayuError(f"{directory}: the trainer state is unreadable ({type(exc).__name__}: {exc})") from None
