"""benchmarks/gpu_check.py: its CPU smoke mode here, the real one-GPU check where CUDA is.

The GPU test is marked `gpu` (and skipped without CUDA): it is the issue-19 acceptance run, a ~0.4B
Qwen2 at seq 2048 in bf16, huayu vs transformers.Trainer, a few minutes on one H100/H200.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
JOBS = ["huayu-full", "hf-full", "huayu-lora", "hf-lora"]
# The GPU run's bar: huayu's loop at least this fast as Trainer's, and at most this much more memory.
MIN_SPEED_RATIO = 0.8
MAX_MEMORY_RATIO = 1.25


def _skip_unless_huayu_has(gpu_check, argv):
    missing = gpu_check.missing_huayu_flags(gpu_check.required_flags(gpu_check.parse_args(argv)))
    if missing:
        pytest.skip(f"`huayu sft` has no {', '.join(missing)} yet (issue 19's training flags)")


def _run(argv, timeout):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_flags_are_read_from_huayu_help():
    gpu_check = load_script(SCRIPT)
    assert gpu_check.missing_huayu_flags(["--max-steps", "--lora-rank", "--no-such-flag"]) == ["--no-such-flag"]


def test_flops_per_token():
    gpu_check = load_script(SCRIPT)
    # full: 6N + 12*L*d*T; LoRA: frozen weights cost 4 FLOPs per parameter, adapters 6
    assert gpu_check.flops_per_token("full", 1000, 10, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    assert gpu_check.flops_per_token("lora", 1000, 10, 2, 8, 16) == 4 * 1000 + 6 * 10 + 12 * 2 * 8 * 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_cuda():
    result = _run([], timeout=300)
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr and "--smoke" in result.stderr


@pytest.mark.slow  # ~45 s on 2 cores: four training jobs, each in its own process
def test_smoke_run_prints_the_summary(tmp_path):
    gpu_check = load_script(SCRIPT)
    _skip_unless_huayu_has(gpu_check, ["--smoke"])
    out = tmp_path / "gpu_check.json"
    result = _run(["--smoke", "--json", str(out)], timeout=600)
    if result.returncode == gpu_check.MISSING_FLAGS_EXIT:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "gpu_check summary" in result.stdout
    for line in ["huayu/HF full", "huayu/HF lora", "MFU(cpu)", "CPU: not a GPU figure", *JOBS]:
        assert line in result.stdout
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["smoke"] and summary["seq_len"] == 128
    for job in JOBS:
        row = summary["jobs"][job]
        assert row["tokens_per_s"] > 0 and row["peak_mem"] > 0
        assert round(row["tokens_per_seq"]) == 128  # both sides train on full, unpadded sequences
    assert set(summary["ratios"]) == {"full", "lora"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an H100/H200: ~0.4B model at seq 2048)")
def test_gpu_check_on_one_gpu(tmp_path):
    gpu_check = load_script(SCRIPT)
    _skip_unless_huayu_has(gpu_check, [])
    out = tmp_path / "gpu_check.json"
    result = _run(["--json", str(out)], timeout=900)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["seq_len"] == 2048 and summary["bf16"] and not summary["smoke"]
    for job in JOBS:
        row = summary["jobs"][job]
        assert round(row["tokens_per_seq"]) == 2048
        assert 0 < row["mfu"] < 1 and row["peak_mem"] > 0
    for method in ("full", "lora"):
        ratio = summary["ratios"][method]
        assert ratio["tokens_per_s"] >= MIN_SPEED_RATIO, (method, ratio)
        assert ratio["peak_mem"] <= MAX_MEMORY_RATIO, (method, ratio)
