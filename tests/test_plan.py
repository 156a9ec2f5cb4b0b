"""`huayu plan`: its estimate of a training process's peak memory against the peak RSS measured for
real CPU runs of the same shape, each plan and run in a fresh process of its own."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from huayu.cli import main

ROOT = Path(__file__).parents[1]
# the command, then this process's peak resident memory (Linux reports KiB)
MEASURED = ("import resource, sys\nfrom huayu.cli import main\ncode = main(sys.argv[1:])\n"
            "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\nsys.exit(code)")
CHARS = [chr(0x4E00 + i) for i in range(3000)]  # a real-sized character vocabulary: the logits count


def run_python(args, code=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "huayu.cli", *args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer of ~3,000 characters, text enough for 16 blocks of 256 tokens, and a `small`
    model saved as a user's checkpoint is (adapters need a saved base)."""
    from huayu.models.loading import load_model, load_tokenizer
    from huayu.tokenizer import train_tokenizer

    rng = random.Random(0)
    lines = ["".join(rng.choices(CHARS, k=200)) for _ in range(40)] + ["".join(CHARS)]
    root = tmp_path_factory.mktemp("plan")
    train_tokenizer(lines, kind="char", vocab_size=3100).save_pretrained(root / "tok")
    (root / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer("small", str(root / "tok"))
    load_model("small", tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


SHAPE = ["--seq-len", "256"]


@pytest.mark.parametrize("method, bf16", [("full", False), ("lora", False), ("prefix", False), ("full", True)])
def test_plan_is_within_30_percent_of_the_measured_peak_rss(corpus, tmp_path, method, bf16):
    common = ["--method", method, *SHAPE]
    model = str(corpus / "model")
    plan = json.loads(run_python(["plan", model, *common, "--batch", "16", "--json", *(["--bits", "16"] * bf16)]))
    out = run_python(["pretrain", "--model", model, *common, *(["--bf16"] * bf16), "--batch-size", "16", "--data",
                      str(corpus / "text.txt"), "--max-steps", "3", "--no-cache", "--out", str(tmp_path / "run")],
                     code=MEASURED)
    measured = int(out.rsplit("PEAK_RSS", 1)[1].split()[0])
    assert f"{plan['trainable']:,} trainable" in out  # the plan prepares the model as the stage does
    ratio = plan["process_rss"] / measured
    print(f"{method}{' bf16' * bf16}: planned {plan['process_rss'] / 2**20:,.0f} MiB, measured {measured / 2**20:,.0f} MiB "
          f"(ratio {ratio:.2f}); tensors at the peak {plan['peak_tensors'] / 2**20:,.0f} MiB")
    assert 0.7 <= ratio <= 1.3
    # and the model's share is the bigger part of it, so the comparison is not just the framework's baseline
    assert plan["process_rss"] - plan["baseline"] > plan["baseline"]


def test_plan_counts_what_the_method_trains(corpus, capsys):
    """LoRA and prefix tuning train a small share (their optimiser state shrinks with it); bf16
    autocast halves what backward keeps; int4 inference holds a fraction of the fp32 weights."""
    def plan(*args):
        assert main(["plan", "small", "--tokenizer", str(corpus / "tok"), "--batch", "4", *SHAPE, "--json",
                     *args]) == 0
        return json.loads(capsys.readouterr().out)

    full, lora, prefix, bf16 = plan(), plan("--method", "lora"), plan("--method", "prefix"), plan("--bits", "16")
    assert full["trainable"] == full["parameters"] and full["optimizer"] == 2 * full["gradients"]
    for adapted in (lora, prefix):
        assert 0 < adapted["trainable"] < full["parameters"] / 20
        assert adapted["optimizer"] < full["optimizer"] / 20
    assert bf16["activations"] < 0.85 * full["activations"]  # the matmuls' outputs; logits and the residual stay fp32
    fp32, int4 = plan("--inference"), plan("--inference", "--bits", "4")
    assert int4["weights"] < 0.5 * fp32["weights"] and int4["gradients"] == int4["optimizer"] == 0


@pytest.mark.parametrize("model", ["t5-tiny", "bert-tiny", "glm-tiny"])
def test_plan_takes_every_family(model, corpus, capsys):
    assert main(["plan", model, "--vocab-size", "3000", "--method", "lora", "--seq-len", "64", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "lora fine-tuning step" in text and "CPU process, peak RSS" in text


def test_plan_refuses_what_cannot_run(corpus, capsys):
    assert main(["plan", "small", "--tokenizer", str(corpus / "tok"), "--bits", "4"]) == 1
    assert "inference only" in capsys.readouterr().err
    assert main(["plan", "small"]) == 1
    assert "--vocab-size" in capsys.readouterr().err
