"""The training loop: outputs, checkpoints, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_conversations, write_texts

from huayu.cli import main


def pretrain_args(tokenizer_dir, data, out, steps=200, extra=()):
    return ["pretrain", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", data, "--valid-data", data,
            "--seq-len", "16", "--batch-size", "2", "--max-steps", str(steps), "--save-every", "10",
            "--log-every", "10", "--warmup-steps", "5", "--out", str(out), *extra]


def test_pretrain_writes_a_plain_transformers_model(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_texts(tmp_path / "t.txt")
    out = tmp_path / "pt"
    assert main(pretrain_args(tokenizer_dir, data, out, steps=20)) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "loss_curve.png",
                 "log.jsonl", "train_result.json"):
        assert (out / name).exists(), name
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-20"]
    assert (out / "checkpoints" / "step-20" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [10, 20]
    assert rows[0]["train_loss"] > rows[1]["train_loss"]


def test_existing_run_needs_resume(tmp_path, tokenizer_dir, capsys):
    data = write_texts(tmp_path / "t.txt")
    assert main(pretrain_args(tokenizer_dir, data, tmp_path / "pt", steps=10)) == 0
    assert main(pretrain_args(tokenizer_dir, data, tmp_path / "pt", steps=10)) == 1
    assert "--resume" in capsys.readouterr().err


def _run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "huayu.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def test_sigkill_and_resume_ends_with_the_same_loss(tmp_path, tokenizer_dir):
    data = write_texts(tmp_path / "t.txt")
    steps = 150
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(pretrain_args(tokenizer_dir, data, full, steps)).wait() == 0
    proc = _run(pretrain_args(tokenizer_dir, data, killed, steps))
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-30").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train_result.json").exists(), "the run finished before it could be killed"
    assert _run(pretrain_args(tokenizer_dir, data, killed, steps, ["--resume"])).wait() == 0
    a = json.loads((full / "train_result.json").read_text())
    b = json.loads((killed / "train_result.json").read_text())
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    logged = lambda out: [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                          if "train_loss" in r]
    assert [r["step"] for r in logged(killed)] == [r["step"] for r in logged(full)]


def test_sft_on_dialogues(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir, "--data", data, "--epochs", "2", "--batch-size", "3",
                 "--out", str(out)]) == 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["steps"] == 4  # 6 dialogues / 3 per batch x 2 epochs
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template  # the template travels with the model
