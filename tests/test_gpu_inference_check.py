"""benchmarks/gpu_inference_check.py: its CPU smoke mode here, the real one-GPU check where CUDA is.

The GPU test is marked `gpu` (and skipped without CUDA): issue 20's inference check, `huayu generate`'s loop
and `huayu serve` on a ~0.4B Qwen2 in bf16 beside transformers' generate(), about 2 minutes on one H100/H200.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_inference_check.py"


def _run(argv, timeout):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _check_generate(summary, batch_sizes, new_tokens):
    """Both sides, at every batch size, generated every token at a positive rate."""
    rows = {(r["side"], r["batch"]): r for r in summary["generate"]}
    assert set(rows) == {(side, b) for side in ("huayu", "HF") for b in batch_sizes}
    for r in rows.values():
        assert r["tokens"] == r["batch"] * new_tokens and r["tokens_per_s"] > 0


def _check_serve(summary, clients, serve_tokens):
    """Every client of every level was answered with all its tokens."""
    serve = summary["serve"]
    assert [r["clients"] for r in serve["rows"]] == clients, serve
    for r in serve["rows"]:
        assert r["failures"] == 0, r["first_failure"]
        assert r["completion_tokens"] == r["clients"] * serve_tokens and r["tokens_per_s"] > 0
        assert 0 < r["p50_s"] <= r["p95_s"]


def test_first_difference():
    check = load_script(SCRIPT)
    assert check.first_difference([[1, 2, 3]], [[1, 2, 3]]) is None
    assert check.first_difference([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == 1
    assert check.first_difference([[1, 2]], [[1, 2, 3]]) == 2  # one side ended earlier


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_cuda():
    result = _run([], timeout=120)
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr and "--smoke" in result.stderr


def test_smoke_run_prints_the_tables(tmp_path):  # ~10 s on 2 cores
    out = tmp_path / "check.json"
    result = _run(["--smoke", "--json", str(out)], timeout=180)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for text in ("same as HF", "largest batch", "--smoke checks the script"):
        assert text in result.stdout
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == summary  # the last line is the JSON
    assert summary["smoke"] and summary["model"]["dtype"] == "float32"
    _check_generate(summary, [1, 4], new_tokens=8)
    _check_serve(summary, [4, 8], serve_tokens=8)
    # fp32 on one CPU: huayu's greedy loop and generate() pick the same tokens
    assert all(r["same_as_hf"] for r in summary["generate"] if r["side"] == "huayu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an H100/H200: ~0.4B model in bf16)")
def test_gpu_inference_check_on_one_gpu(tmp_path):
    out = tmp_path / "check.json"
    result = _run(["--json", str(out)], timeout=600)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert not summary["smoke"] and summary["model"]["dtype"] == "bfloat16"
    _check_generate(summary, [1, 32], new_tokens=128)
    if "skipped" in summary["serve"]:  # generate checked; serving needs fastapi and uvicorn
        pytest.skip(summary["serve"]["skipped"])
    _check_serve(summary, [32, 128], serve_tokens=64)
