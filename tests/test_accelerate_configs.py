"""The accelerate configs shipped in examples/accelerate/ parse with accelerate's own code and say what
their names promise: 8 processes on one machine, bf16, and DDP / FSDP full sharding / DeepSpeed
ZeRO-2 and ZeRO-3 (whose settings are examples/deepspeed/zero*.json, parsed by accelerate's
DeepSpeedPlugin and DeepSpeed's own config class).

Each file goes through what `accelerate launch --config_file FILE` does before it starts any process
(the config loader, the launcher's argument merge, the environment it hands to the workers) and then
through what huayu reads of that environment. No GPU needed.
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
    # a DeepSpeed config takes its precision from its JSON file ("auto": huayu's --bf16)
    assert config.mixed_precision == (None if name.startswith("zero") else "bf16")
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
    assert not sorted(set(config.deepspeed_config) - options)
    args, _ = _launch_args(CONFIGS / f"{name}.yaml")
    assert args.num_processes == 8
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (name == "ddp", name == "fsdp",
                                                                   name.startswith("zero"))


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


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_and_leave_the_loop_to_huayu(stage, monkeypatch):
    """zero{2,3}.yaml hand the workers the JSON file; accelerate's DeepSpeedPlugin and DeepSpeed's own
    config class read it as ZeRO-N once huayu has filled its "auto" values from its flags."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from deepspeed.runtime.config import DeepSpeedConfig

    from huayu.train import distributed, loop, parallel

    args, defaults = _launch_args(CONFIGS / f"zero{stage}.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"examples/deepspeed/zero{stage}.json"
    assert env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false") == "false"  # every rank loads, then shards
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith("ACCELERATE_DEEPSPEED")}):
        monkeypatch.chdir(CONFIGS.parents[1])
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    layout = parallel.DeepSpeedZeRO(accelerator, loop.TrainArgs(batch_size=4, grad_accum=2, max_grad_norm=1.0))
    assert layout.stage == stage and layout.everyone_validates == (stage == 3)
    config = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("bf16", "fp16")}  # accelerate fills these
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (4, 2)
    assert parsed.gradient_clipping == 1.0
    with mock.patch.dict(os.environ, env):
        assert distributed.deepspeed_requested()
