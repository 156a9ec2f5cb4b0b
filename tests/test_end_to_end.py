"""The whole path in one tiny run: tokenizer -> pretrain -> sft -> eval -> piped chat (`huayu demo`)."""

import json

import pytest
from conftest import DIALOGUES

from huayu.cli import main


def write_chatterbot_corpus(directory):
    directory.mkdir()
    lines = ["categories:", "- 测试", "conversations:"]
    for turns in DIALOGUES * 3:
        lines.append(f"- - {turns[0]}")
        lines += [f"  - {t}" for t in turns[1:]]
    (directory / "test.yml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_tiny_end_to_end(tmp_path, capsys):
    corpus = write_chatterbot_corpus(tmp_path / "corpus")
    out = tmp_path / "demo"
    assert main(["demo", "--corpus", str(corpus), "--out", str(out), "--pretrain-steps", "20",
                 "--sft-epochs", "2", "--test-every", "3"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"loss", "ppl", "bleu4", "dist1", "dist2", "dist3", "dist4", "f1", "rouge_l"}
    assert metrics["samples"] == 6  # every 3rd of 18 conversations is held out
    assert (out / "sft" / "loss_curve.png").exists() and (out / "pretrain" / "model.safetensors").exists()
    assert printed.count("模型 >>> ") == 4  # the closing conversation


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The README's main job on the real bundled corpus (chatterbot-corpus)."""
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == 47
