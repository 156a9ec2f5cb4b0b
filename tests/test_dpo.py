"""`huayu dpo`: DPO against the frozen start (a second copy, or with LoRA the adapter switched off),
SimPO without a reference, and exact resume, on the tiny model and a synthetic preference."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_preferences import synthetic_pairs, write_jsonl

from huayu.cli import main


def dpo_args(model, data, out, *extra):
    return ["dpo", "--model", model, "--data", data, "--val-ratio", "0.25", "--batch-size", "4", "--max-steps", "6",
            "--lr", "1e-3", "--log-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs(3))


@pytest.fixture
def loads(monkeypatch):
    """The models each run loads (the policy, and the reference where it is a second copy)."""
    import huayu.models.loading as loading

    loaded, load = [], loading.load_model

    def counting(spec, *args, **kwargs):
        loaded.append(spec)
        return load(spec, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counting)
    return loaded


def train_rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


@pytest.mark.parametrize("method, copies", [("full", 2), ("lora", 1)])
def test_dpo_starts_at_log_2_and_the_margin_grows(method, copies, tiny_model_dir, pairs, tmp_path, loads):
    out = tmp_path / method
    assert main(dpo_args(tiny_model_dir, pairs, out, "--finetuning-type", method)) == 0
    assert loads == [tiny_model_dir] * copies  # LoRA's reference is the policy with its adapter off
    rows = train_rows(out)
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference
    assert rows[0]["train_rewards/margins"] == pytest.approx(0, abs=1e-5)
    margins = [r["train_rewards/margins"] for r in rows]
    assert margins[-1] > margins[1] > 0 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    result = json.loads((out / "train_result.json").read_text())
    assert result["eval_rewards/accuracies"] > 0.5 and result["eval_rewards/margins"] > 0
    assert (out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).exists()


def test_the_reference_with_the_adapter_off_is_the_base_held_once(tiny_model_dir, tokenizer, pairs, tmp_path):
    import torch

    from huayu.data.chat import ensure_chat_template
    from huayu.data.preferences import encode_pairs, pair_collate, read_preferences
    from huayu.models.families import DECODER
    from huayu.models.loading import load_model
    from huayu.train.dpo import DpoConfig, DpoLoss, adapter_disabled
    from huayu.train.methods import FinetuningArgs, apply_finetuning
    from huayu.train.preference import sequence_logps

    ensure_chat_template(tokenizer)
    examples = encode_pairs(tokenizer, DECODER, read_preferences(pairs).records[:2], 64, 64)
    batch = pair_collate(tokenizer.pad_token_id)(examples)
    base = load_model(tiny_model_dir, tokenizer)
    base_pointers = {p.data_ptr() for p in base.parameters()}
    with torch.no_grad():
        expected = sequence_logps(base, batch)[0]
    policy = apply_finetuning(base, FinetuningArgs(finetuning_type="lora"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: the policy now differs from its base
    loss = DpoLoss(DpoConfig(model=tiny_model_dir), tokenizer)
    loss.attach(policy)
    assert loss.reference is adapter_disabled
    assert not torch.allclose(sequence_logps(policy, batch)[0], expected)
    assert torch.allclose(loss.reference(policy, batch), expected, atol=1e-5)
    frozen = {n: p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n}
    assert set(frozen.values()) <= base_pointers  # the base's weights, not a copy of them


def test_simpo_trains_without_a_reference(tiny_model_dir, pairs, tmp_path, loads):
    out = tmp_path / "simpo"
    assert main(dpo_args(tiny_model_dir, pairs, out, "--loss", "simpo", "--beta", "2.0", "--gamma", "0.5")) == 0
    assert loads == [tiny_model_dir]
    rows = train_rows(out)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["train_rewards/margins"] > rows[0]["train_rewards/margins"]
    assert rows[0]["train_rewards/chosen"] < 0  # β × a mean token log-probability


def test_dpo_resumes_exactly(tiny_model_dir, pairs, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(dpo_args(tiny_model_dir, pairs, straight, "--max-steps", "4", "--save-every", "2")) == 0
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")  # as if stopped after the checkpoint at step 2
    (resumed / "train_result.json").unlink()
    assert main(dpo_args(tiny_model_dir, pairs, resumed, "--max-steps", "4", "--save-every", "2", "--resume")) == 0
    a, b = (json.loads((d / "train_result.json").read_text()) for d in (straight, resumed))
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert b["eval_rewards/margins"] == pytest.approx(a["eval_rewards/margins"], abs=1e-5)
    assert [r["step"] for r in train_rows(resumed)] == [1, 2, 3, 4]


def test_the_dpo_model_is_a_plain_chat_model(tiny_model_dir, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    assert main(dpo_args(tiny_model_dir, pairs, out, "--max-steps", "1")) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()


def test_dpo_refuses_bad_options(tiny_model_dir, pairs, tmp_path, capsys):
    assert main(dpo_args(tiny_model_dir, pairs, tmp_path / "a", "--loss", "ipo")) == 1
    assert "--loss must be one of sigmoid, simpo" in capsys.readouterr().err
    assert main(dpo_args(tiny_model_dir, pairs, tmp_path / "b", "--beta", "0")) == 1
    assert "--beta must be positive" in capsys.readouterr().err
    assert main(dpo_args(tiny_model_dir, pairs, tmp_path / "c", "--val-ratio", "1")) == 1
    assert "--val-ratio must be in [0, 1)" in capsys.readouterr().err
