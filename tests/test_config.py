import argparse
from dataclasses import dataclass

import pytest

from huayu.config import (ConfigError, add_config_arguments, build_config, config_from_args, field_doc,
                          save_config)
from huayu.train.loop import TrainArgs


@dataclass
class Cfg:
    model: str = field_doc("model", positional=True, default=None)
    names: list[str] = field_doc("names", default_factory=list)
    roles: dict[str, str] = field_doc("roles", default_factory=dict)
    train: TrainArgs = field_doc("train", default_factory=TrainArgs)


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, Cfg)
    return config_from_args(Cfg, p.parse_args(argv))


def test_defaults_yaml_and_cli_layers(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 0.01\n  batch_size: 4\nnames: [a, b]\n", encoding="utf-8")
    cfg = parse(["m", "--config", str(yml), "--train.batch_size", "2", "--warmup-steps", "5",
                 "--roles", "client=user,counselor=assistant", "--bf16"])
    assert cfg.model == "m"
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 2 and cfg.train.warmup_steps == 5
    assert cfg.names == ["a", "b"] and cfg.roles == {"client": "user", "counselor": "assistant"}
    assert cfg.train.bf16 is True and cfg.train.epochs == 1.0


def test_unknown_yaml_key_is_an_error(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  learning_rate: 0.01\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        parse(["--config", str(yml)])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(Cfg, {"train": {"batch_size": "many"}})


def test_saved_config_round_trips(tmp_path):
    import yaml

    cfg = parse(["m", "--lr", "0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(Cfg, yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8")))
    assert again == cfg


def test_list_flags_take_several_values():
    cfg = parse(["--names", "a.txt", "b.txt"])
    assert cfg.names == ["a.txt", "b.txt"]


@dataclass
class Sampling:
    do_sample: bool = field_doc("sample", default=False)
    temperature: float = field_doc("temperature", default=1.0)
    max_new_tokens: int = field_doc("max new tokens", default=64)


@dataclass
class WithFactory:
    decoding: Sampling = field_doc("decoding", default_factory=lambda: Sampling(do_sample=True, temperature=0.7))


def test_a_flag_of_a_section_keeps_the_rest_of_its_factory_default():
    p = argparse.ArgumentParser()
    add_config_arguments(p, WithFactory)
    cfg = config_from_args(WithFactory, p.parse_args(["--max-new-tokens", "24"]))
    assert cfg.decoding == Sampling(do_sample=True, temperature=0.7, max_new_tokens=24)
    helptext = p.format_help()
    assert "(default: 0.7)" in helptext and "(default: True)" in helptext


def test_usage_is_one_line(capsys):
    from huayu.cli import main

    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage == "usage: huayu sft [options]"
