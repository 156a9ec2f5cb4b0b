"""The accelerate configs shipped in examples/accelerate/ parse with accelerate's own code and say what
their names promise: 8 processes on one machine, bf16, and DDP / FSDP full sharding. (No DeepSpeed
configs: huayu's loop refuses DeepSpeed launches until it runs DeepSpeed's engine; docs/distributed.md.)

Each file goes through what `accelerate launch --config_file FILE` does before it starts any process
(the config loader, the launcher's argument merge, the environment it hands to the workers) and then
through what huayu reads of that environment. No GPU needed.
"""

import os
from pathlib import Path
from unittest import mock

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}


def _launch_args(path: Path):
    """(launcher args, the loaded config) as `accelerate launch --config_file path train.py` sees them."""
    from accelerate.commands import launch

    args = launch.launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = launch._validate_launch_command(args)
    return args, defaults


def _worker_env(path: Path) -> dict:
    """The environment `accelerate launch` gives the training processes."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    return prepare_multi_gpu_env(_launch_args(path)[0])


def test_every_setup_is_shipped():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED[name]
    assert (config.num_processes, config.num_machines, config.machine_rank) == (8, 1, 0)
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False
    assert ClusterConfig.from_yaml_file(str(path)).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_nested_key_is_a_launch_option(name):
    """accelerate copies fsdp_config keys onto its launch arguments without checking them: a misspelt
    key would be ignored silently."""
    from accelerate.commands import launch
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    options = {a.dest for a in launch.launch_command_parser()._actions}
    assert not sorted(set(config.fsdp_config) - options)
    args, _ = _launch_args(CONFIGS / f"{name}.yaml")
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (name == "ddp", name == "fsdp", False)


def test_fsdp_config_asks_huayu_for_fsdp2_with_whole_loading():
    """huayu shards with FSDP2 itself (distributed.shard_model): the config must switch it on and
    must not ask for rank-0-only loading, which huayu's every-rank loading does not do."""
    from huayu.train import distributed

    env = _worker_env(CONFIGS / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false") == "false"
    assert env.get("FSDP_SYNC_MODULE_STATES", "false") == "false"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # unset: taken from the model
    with mock.patch.dict(os.environ, env):
        assert distributed.fsdp_requested(False)
