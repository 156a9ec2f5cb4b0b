"""`huayu eval` on a tiny model: EVA and ADGEN scores, prediction files, the general-set loss, usage."""

import json
import math

import pytest
from conftest import DIALOGUES, TEXTS, write_conversations, write_texts

from huayu.cli import main

EVA_KEYS = {"loss", "ppl", "bleu4", "dist1", "dist2", "dist3", "dist4", "f1", "rouge_l", "samples"}
ADGEN_KEYS = {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
FAST = ["--max-new-tokens", "4", "--batch-size", "4"]


def _eval(model, out, *args):
    assert main(["eval", model, "--out", str(out), *FAST, *args]) == 0
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _general(tmp_path):
    return write_texts(tmp_path / "general.txt", TEXTS * 2)  # ~100 tokens: 3 blocks of 32 and a short tail


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_writes_both_conventions_and_predictions(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "test.jsonl")
    metrics = _eval(tiny_model_dir, tmp_path / "out", "--data", data)
    assert set(metrics) == EVA_KEYS | {"adgen", "conventions"}
    assert metrics["samples"] == len(DIALOGUES)
    assert set(metrics["adgen"]) == ADGEN_KEYS
    assert set(metrics["conventions"]) == {"eva", "adgen"}
    predictions = _jsonl(tmp_path / "out" / "predictions.jsonl")
    chatglm = _jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert [p["reference"] for p in predictions] == [d[-1] for d in DIALOGUES]
    assert chatglm == [{"labels": p["reference"], "predict": p["generation"]} for p in predictions]


def test_eval_adgen_columns(tiny_model_dir, tmp_path):
    rows = [{"content": "类型#裙*颜色#红色", "summary": "这条红色的裙子很漂亮。"},
            {"content": "类型#上衣*材质#棉", "summary": "棉质上衣穿着舒服。"}]
    data = tmp_path / "adgen.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metrics = _eval(tiny_model_dir, tmp_path / "out", "--data", str(data),
                    "--prompt-column", "content", "--response-column", "summary")
    assert metrics["samples"] == 2
    chatglm = _jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert [row["labels"] for row in chatglm] == [r["summary"] for r in rows]


def test_eval_general_data_alone(tiny_model_dir, tmp_path):
    corpus = _general(tmp_path)
    four = _eval(tiny_model_dir, tmp_path / "four", "--general-data", corpus, "--general-seq-len", "32")
    assert set(four) == {"general_loss", "general_ppl"}
    assert four["general_ppl"] == pytest.approx(math.exp(four["general_loss"]), rel=1e-3)
    assert not (tmp_path / "four" / "predictions.jsonl").exists()
    # Token-weighted: batching the short tail block with full ones (padding) does not change the loss.
    one = _eval(tiny_model_dir, tmp_path / "one", "--general-data", corpus, "--general-seq-len", "32",
                "--batch-size", "1")
    assert one["general_loss"] == pytest.approx(four["general_loss"], abs=1e-3)


def test_eval_general_data_with_dialogues(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "test.jsonl", DIALOGUES[:2])
    metrics = _eval(tiny_model_dir, tmp_path / "out", "--data", data, "--general-data", _general(tmp_path))
    assert set(metrics) == EVA_KEYS | {"adgen", "conventions", "general_loss", "general_ppl"}
    assert len(_jsonl(tmp_path / "out" / "generated_predictions.jsonl")) == 2


def test_eval_needs_data_or_general_data(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", tiny_model_dir, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "usage: huayu eval MODEL --data PATH" in err and "--general-data PATH" in err
    assert not (tmp_path / "out").exists()


def test_eval_general_seq_len_must_fit_the_model(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", tiny_model_dir, "--general-data", _general(tmp_path), "--general-seq-len", "100000",
                 "--out", str(tmp_path / "out")]) == 1
    assert "--general-seq-len must be between 2 and the model's context" in capsys.readouterr().err
