"""`huayu plan`: its estimate of a training process's peak memory against the peak RSS measured for
real CPU runs of the same shape, each plan and run in a fresh process of its own; its GPU plans of a
7B model against LLaMA-Factory's published table, and what sharding changes."""

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


# LLaMA-Factory's README, "Hardware Requirement", its 7B column (GB), row by row as huayu plan's flags.
# "Full (AMP)" trains fp32 master weights under bf16 autocast, "Full (bf16)" keeps the weights and AdamW's
# state in bf16 (--pure-bf16); Freeze (its last 2 layers) and LoRA train on a bf16 base; QLoRA on a 4- or
# 8-bit one.
LLAMA_FACTORY_7B_GB = {
    "full-amp": (["--method", "full"], 120),
    "full-bf16": (["--method", "full", "--pure-bf16"], 60),
    "freeze": (["--method", "freeze"], 20),
    "lora": (["--method", "lora"], 16),
    "qlora-8": (["--method", "lora", "--quantization-bit", "8"], 10),
    "qlora-4": (["--method", "lora", "--quantization-bit", "4"], 6),
}
# One set of assumptions for every row, LLaMA-Factory's defaults: bf16, gradient checkpointing, one GPU's
# micro-batch of one sequence of 1,024 tokens.
GPU_RUN = ["--model", "llama-7b", "--bf16", "--batch-size", "1", "--seq-len", "1024", "--gpus", "1"]


def plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("row", LLAMA_FACTORY_7B_GB)
def test_gpu_plan_of_a_7b_model_is_within_30_percent_of_llama_factorys_table(row, capsys):
    flags, published = LLAMA_FACTORY_7B_GB[row]
    plan = plan_json(capsys, *GPU_RUN, "--gradient-checkpointing", *flags)
    planned = plan["per_gpu"] / 2 ** 30
    print(f"{row}: planned {planned:.1f} GiB, LLaMA-Factory {published} GB ({planned / published - 1:+.0%})")
    assert 0.7 <= planned / published <= 1.3
    assert plan["fits"] == {f"{card} GB": planned <= card for card in (24, 40, 80)}


@pytest.fixture(scope="module")
def full_7b():
    """Full fine-tuning of the 7B shape, planned for one GPU and for 8 with DDP and with FSDP."""
    from huayu.config import build_config
    from huayu.plan import PlanConfig, plan_gpus

    base = dict(model="llama-7b", bf16=True, gradient_checkpointing=True, batch=1, seq_len=1024)
    return {(gpus, sharding): plan_gpus(build_config(PlanConfig, dict(base, gpus=gpus, sharding=sharding)))
            for gpus, sharding in [(1, "none"), (8, "ddp"), (8, "fsdp")]}


def test_fsdp_splits_weights_gradients_and_optimiser_state_across_the_gpus(full_7b):
    one, fsdp = full_7b[1, "none"], full_7b[8, "fsdp"]
    for part in ("weights", "gradients", "optimizer", "optimizer_step"):
        assert getattr(fsdp, part) == getattr(one, part) // 8, part
    assert fsdp.weights_by_dtype == one.weights_by_dtype  # the model's, before sharding
    # it gathers the root unit and two layers in bf16, and so holds no autocast copies of the fp32 weights
    assert 0 < fsdp.fsdp_gathered < one.weights / 8 and fsdp.activations < one.activations
    assert not one.fits["80 GB"] and fsdp.fits["40 GB"]


def test_ddp_holds_everything_on_every_gpu(full_7b):
    one, ddp = full_7b[1, "none"], full_7b[8, "ddp"]
    for part in ("weights", "optimizer", "activations", "optimizer_step"):
        assert getattr(ddp, part) == getattr(one, part), part
    assert ddp.gradients == 2 * one.gradients  # and its all-reduce buckets, a second copy
    assert ddp.fsdp_gathered == 0 and ddp.per_gpu > one.per_gpu


def test_gradient_checkpointing_keeps_the_layer_inputs_and_recomputes_one_layer(capsys):
    """Checkpointed, the activations are about the layers' inputs (bf16) and one layer's recomputed
    activations, with the logits; not checkpointed, every layer's."""
    lora = [*GPU_RUN, "--method", "lora"]
    kept, checkpointed = plan_json(capsys, *lora), plan_json(capsys, *lora, "--gradient-checkpointing")
    layer_inputs = 32 * 1024 * 4096 * 2
    assert layer_inputs < checkpointed["activations"] < 3 * layer_inputs
    assert kept["activations"] > 8 * checkpointed["activations"]
    assert kept["weights"] == checkpointed["weights"]


def test_gpu_plan_prints_a_table_by_component(capsys):
    assert main(["plan", "tiny", "--vocab-size", "3000", "--method", "lora", "--quantization-bit", "4", "--gpus", "1",
                 "--batch-size", "2", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    for row in ("weights", "gradients", "optimiser state", "activations", "optimiser step", "CUDA and framework",
                "peak per GPU", "fits on 24 GB: yes, 40 GB: yes, 80 GB: yes"):
        assert row in text
    assert "nf4" in text and "nf4 base (QLoRA)" in text


def test_gpu_plan_refuses_what_cannot_run(capsys):
    for args, error in [(["--quantization-bit", "4", "--method", "lora"], "add --gpus N"),
                        (["--gpus", "8"], "--sharding ddp"),
                        (["--gpus", "1", "--quantization-bit", "4"], "--finetuning-type lora"),
                        (["--gpus", "1", "--bits", "4", "--inference"], "--quantization-bit"),
                        (["--gpus", "1", "--sharding", "zero"], "--sharding must be one of")]:
        assert main(["plan", "tiny", "--vocab-size", "3000", *args]) == 1
        assert error in capsys.readouterr().err
