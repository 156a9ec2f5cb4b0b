"""`huayu rm`, `huayu rm score` and `huayu rm compare` on the tiny model and a synthetic preference
(the chosen reply ends with 谢谢你)."""

from __future__ import annotations

import json

import pytest
from test_preferences import synthetic_pairs, write_jsonl

from huayu.cli import main


def rm_args(model, data, out, *extra):
    return ["rm", "--model", model, "--data", data, "--val-ratio", "0.25", "--batch-size", "4", "--max-steps", "20",
            "--lr", "1e-3", "--eval-every", "5", "--save-every", "5", "--log-every", "5", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs(3))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir, pairs):
    out = tmp_path_factory.mktemp("rm") / "rm"
    assert main(rm_args(tiny_model_dir, pairs, out)) == 0
    return out


def test_the_reward_model_learns_the_preference_and_keeps_its_best(reward_model):
    rows = [json.loads(line) for line in (reward_model / "log.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert train[-1] < train[0] < 0.75  # from about log 2
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20] and {"eval_loss", "eval_margin"} <= set(evals[0])
    assert evals[-1]["eval_accuracy"] > 0.5 and evals[-1]["eval_margin"] > 0
    best = json.loads((reward_model / "best" / "metrics.json").read_text())
    assert best["accuracy"] == max(r["eval_accuracy"] for r in evals)
    assert json.loads((reward_model / "train_result.json").read_text())["best_step"] == best["step"]


def test_plain_transformers_loads_the_reward_model_and_scores_as_rm_score(reward_model, pairs, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    good, bad = "你好，很高兴认识你。谢谢你", "你好，很高兴认识你。"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": r}],
                                           tokenize=False) for r in (good, bad)]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).logits[:, 0].tolist()
    assert plain[0] > plain[1]

    assert main(["rm", "score", "--model", str(reward_model), "--prompt", "你好", "--response", good, bad]) == 0
    printed = [float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()]
    assert printed == pytest.approx(plain, abs=1e-4)

    scores = tmp_path / "scores.jsonl"
    assert main(["rm", "score", "--model", str(reward_model), "--data", pairs, "--out", str(scores)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 24 and metrics["accuracy"] > 0.5
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert sum(r["chosen"] > r["rejected"] for r in rows) / 24 == metrics["accuracy"]
    assert main(["rm", "score", "--model", str(reward_model)]) == 1
    assert "usage: huayu rm score" in capsys.readouterr().err


def test_a_lora_reward_model_trains_and_saves_its_head_with_the_adapter(tiny_model_dir, pairs, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "rm-lora"
    assert main(rm_args(tiny_model_dir, pairs, out, "--finetuning-type", "lora", "--max-steps", "5")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert any(key.endswith("score.weight") for key in f.keys())
    capsys.readouterr()
    assert main(["rm", "score", "--model", str(out), "--data", pairs]) == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out)["pairs"] == 24
    assert best["step"] == 5


def test_compare_judges_a_model_against_itself_as_all_ties(reward_model, tiny_model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["rm", "compare", "--reward-model", str(reward_model), "--model", tiny_model_dir, "--baseline",
                 tiny_model_dir, "--data", pairs, "--max-samples", "4", "--max-new-tokens", "4", "--out",
                 str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["reward_accuracy"]["pairs"] == 4
    assert result["models"][tiny_model_dir] | {"mean_reward": 0, "baseline_mean_reward": 0} == {
        "win_rate": 0.5, "wins": 0, "ties": 4, "losses": 0, "mean_reward": 0, "baseline_mean_reward": 0}
    assert len((out / "replies.jsonl").read_text().splitlines()) == 4
    assert "| win rate vs" in capsys.readouterr().out


def test_rm_refuses_what_it_cannot_train(tiny_model_dir, pairs, tmp_path, capsys):
    assert main(["rm", "--data", pairs, "--out", str(tmp_path / "a")]) == 1
    assert "usage: huayu rm --model SFT_DIR" in capsys.readouterr().err
    assert main(rm_args(tiny_model_dir, pairs, tmp_path / "b", "--finetuning-type", "prefix")) == 1
    assert "not prefix" in capsys.readouterr().err
    assert main(rm_args("t5-tiny", pairs, tmp_path / "c")) == 1
    assert "trains decoder-only models" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", synthetic_pairs(3) + [{"prompt": "你好", "chosen": "好", "rejected": 1}])
    assert main(rm_args(tiny_model_dir, bad, tmp_path / "d")) == 1
    assert f"{bad}: line 25: rejected: expected text, got int" in capsys.readouterr().err
    assert main(rm_args(tiny_model_dir, bad, tmp_path / "e", "--skip-invalid", "--max-steps", "1")) == 0
    assert f"{bad}: skipped 1 invalid records (--skip-invalid)" in capsys.readouterr().out
