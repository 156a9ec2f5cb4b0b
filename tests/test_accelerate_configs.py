"""The accelerate configs shipped in examples/accelerate/ parse with accelerate's own code and say what
their names promise: 8 processes on one machine, bf16, and DDP / FSDP full sharding / ZeRO-2 / ZeRO-3.

Each file goes through what `accelerate launch --config_file FILE` does before it starts any process
(the config loader, the launcher's argument merge, the environment it hands to the workers) and then
through the plugin the workers build from that environment. No GPU and no DeepSpeed install needed.
"""

import os
from pathlib import Path
from unittest import mock

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def _launch_args(path: Path):
    """(launcher args, the loaded config) as `accelerate launch --config_file path train.py` sees them."""
    from accelerate.commands import launch

    args = launch.launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = launch._validate_launch_command(args)
    return args, defaults


def _worker_env(path: Path) -> dict:
    """The environment `accelerate launch` gives the training processes."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults = _launch_args(path)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as launch_command sets it
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


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
    """accelerate copies fsdp_config / deepspeed_config keys onto its launch arguments without checking
    them: a misspelt key would be ignored silently."""
    from accelerate.commands import launch
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    options = {a.dest for a in launch.launch_command_parser()._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}
    assert not sorted(set(nested) - options)
    args, _ = _launch_args(CONFIGS / f"{name}.yaml")
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == \
        (name == "ddp", name == "fsdp", name.startswith("zero"))


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


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_zero_stage(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    env = _worker_env(CONFIGS / f"{name}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    # left to huayu's --grad-accum and --max-grad-norm
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert plugin.zero3_init_flag is (stage == 3)
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # building the plugin left no global state for later tests
