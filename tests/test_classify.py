"""`huayu finetune-cls`, `huayu export onnx` and `huayu predict` on a tiny sentiment fixture."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import TEXTS

from huayu.cli import main
from huayu.data.classification import read_labelled
from huayu.errors import DataError

# the label is in one character: 好 (positive) or 累 (negative), after a neutral sentence
ROWS = [(f"{text}我{'很好' if i % 2 else '有点累'}。", "positive" if i % 2 else "negative")
        for i, text in enumerate(TEXTS * 8)]


def write_tsv(path, rows, header=True) -> str:
    lines = (["text\tlabel"] if header else []) + [f"{t}\t{y}" for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A bert-tiny classifier fine-tuned from random initialisation on ROWS (headerless dev, as
    ChnSentiCorp's files are)."""
    tmp = tmp_path_factory.mktemp("cls")
    train, dev = write_tsv(tmp / "train.tsv", ROWS), write_tsv(tmp / "dev.tsv", ROWS[:12], header=False)
    test = tmp / "test.tsv"
    test.write_text("text\n" + "".join(f"{t}\n" for t, _ in ROWS[:6]), encoding="utf-8")
    out = tmp / "out"
    code = main(["finetune-cls", "bert-tiny", "--tokenizer", tokenizer_dir, "--train", train, "--dev", dev,
                 "--test", str(test), "--max-length", "32", "--batch-size", "8", "--max-steps", "40", "--lr", "2e-3",
                 "--eval-every", "10", "--save-every", "10", "--save-total-limit", "2", "--out", str(out)])
    assert code == 0
    return out


def test_finetune_cls_keeps_the_best_checkpoint_and_predicts_the_test_set(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(evals[0])
    best = json.loads((trained / "best" / "metrics.json").read_text())
    assert best["accuracy"] == max(r["eval_accuracy"] for r in evals) == 1.0
    assert best["step"] == min(r["step"] for r in evals if r["eval_accuracy"] == best["accuracy"])
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-30", "step-40"]
    result = json.loads((trained / "train_result.json").read_text())
    assert result["best_accuracy"] == 1.0 and result["best_step"] == best["step"]

    model = AutoModelForSequenceClassification.from_pretrained(trained)  # the final model is the best one
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tok = AutoTokenizer.from_pretrained(trained)
    assert len(tok) == model.config.vocab_size

    predictions = (trained / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[2] for line in predictions] == [t for t, _ in ROWS[:6]]  # input order
    assert [line.split("\t")[0] for line in predictions] == [y for _, y in ROWS[:6]]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1 for line in predictions)


def test_labelled_files_are_read_by_header_name_or_number(tmp_path):
    csv = tmp_path / "waimai.csv"
    csv.write_text('label,review\n1,"很好吃, 送得快"\n0,太慢了\n', encoding="utf-8")
    data = read_labelled(str(csv), text_column="review", label_column="label")
    assert data.texts == ["很好吃, 送得快", "太慢了"] and data.labels == ["1", "0"]
    headerless = write_tsv(tmp_path / "h.tsv", [("好", "1"), ("差", "0")], header=False)
    assert read_labelled(headerless).labels == ["1", "0"]
    assert read_labelled(headerless, text_column="1", label_column="0").texts == ["1", "0"]


def test_bad_rows_name_the_file_and_line_or_are_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\n好\tpositive\n没有标签\n累\tnegative\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.tsv: line 3: no label"):
        read_labelled(str(bad))
    assert read_labelled(str(bad), skip_invalid=True).skipped == 1
    with pytest.raises(DataError, match="no label column 'sentiment'"):
        read_labelled(str(bad), label_column="sentiment")
    dev = write_tsv(tmp_path / "dev.tsv", [("好", "neutral")])
    assert main(["finetune-cls", "bert-tiny", "--tokenizer", tokenizer_dir, "--train", str(bad), "--skip-invalid",
                 "--dev", dev, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr()
    assert "skipped 1 invalid rows" in err.out and "labels neutral are not classes" in err.err


def test_export_onnx_matches_pytorch_and_predict_agrees_across_backends(trained, tmp_path, capsys, monkeypatch):
    import numpy as np

    onnx_dir = tmp_path / "onnx"
    assert main(["export", "onnx", str(trained), "--out", str(onnx_dir)]) == 0
    diff = float(capsys.readouterr().out.rsplit(": ", 1)[1])
    assert diff <= 1e-4
    for name in ("model.onnx", "model.safetensors", "config.json", "tokenizer.json"):
        assert (onnx_dir / name).exists(), name

    rows = ROWS[:20]
    outputs = {}
    for backend in ("onnx", "torch"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
            ("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)).encode())))
        assert main(["predict", str(onnx_dir), "--backend", backend, "--label-column", "label",
                     "--batch-size", "7"]) == 0
        captured = capsys.readouterr()
        outputs[backend] = [line.split("\t") for line in captured.out.splitlines()]
        assert "accuracy 1.0000 (20/20)" in captured.err
    assert [cells[2] for cells in outputs["onnx"]] == [t for t, _ in rows]
    assert [c[0] for c in outputs["onnx"]] == [c[0] for c in outputs["torch"]]
    np.testing.assert_allclose([float(c[1]) for c in outputs["onnx"]], [float(c[1]) for c in outputs["torch"]],
                               atol=1e-4)


def test_export_and_predict_refuse_what_they_cannot_use(tmp_path, tiny_model_dir, trained, capsys):
    assert main(["export", "onnx", tiny_model_dir, "--out", str(tmp_path / "x")]) == 1
    assert "not a text classifier" in capsys.readouterr().err
    assert main(["predict", str(trained), "--input", str(tmp_path / "none.tsv")]) == 1
    assert "has no model.onnx" in capsys.readouterr().err


def test_freeze_trains_the_new_head_and_the_last_layers_only(tokenizer, tmp_path, tokenizer_dir, capsys):
    from huayu.models.loading import load_model
    from huayu.train.methods import FinetuningArgs, apply_finetuning

    model = load_model("bert-tiny", tokenizer, classes=["a", "b"])
    apply_finetuning(model, FinetuningArgs(finetuning_type="freeze", freeze_trainable_layers=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(name.startswith(("classifier.", "bert.encoder.layer.1.")) for name in trainable)
    train = write_tsv(tmp_path / "t.tsv", ROWS[:8])
    assert main(["finetune-cls", "bert-tiny", "--tokenizer", tokenizer_dir, "--train", train, "--dev", train,
                 "--finetuning-type", "lora", "--out", str(tmp_path / "o")]) == 1
    assert "full or freeze" in capsys.readouterr().err
