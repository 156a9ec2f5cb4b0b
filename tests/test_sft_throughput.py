"""benchmarks/sft_throughput.py: its counting helpers, and its --smoke run end to end.

The smoke run (alpaca, the `small` preset, cutoff 256, one round of a few steps per side) checks the
script, not the numbers; the full benchmark and its results are in docs/benchmarks.md.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sft_throughput.py"
SIDES = ["huayu", "huayu --packing", "HF Trainer"]


def test_tail_loss_weights_the_last_quarter_of_the_tokens():
    bench = load_script(SCRIPT)
    steps = [{"loss_tokens": 30, "loss": 9.0}, {"loss_tokens": 60, "loss": 5.0}, {"loss_tokens": 10, "loss": 1.0}]
    # the last 25 of 100 tokens: 15 of the second step's, all 10 of the third's
    assert bench.tail_loss(steps) == pytest.approx((15 * 5.0 + 10 * 1.0) / 25)
    assert bench.tail_loss(steps, fraction=1.0) == pytest.approx((30 * 9 + 60 * 5 + 10 * 1) / 100)


def test_rates_leave_out_the_warm_up_steps():
    bench = load_script(SCRIPT)
    steps = [{"loss_tokens": 100, "real": 200, "computed": 400, "seconds": 99.0},
             {"loss_tokens": 50, "real": 80, "computed": 100, "seconds": 1.0},
             {"loss_tokens": 30, "real": 60, "computed": 100, "seconds": 0.5}]
    rates = bench.timed(steps, warmup=1)
    assert rates["loss_tok_s"] == pytest.approx(80 / 1.5) and rates["real_tok_s"] == pytest.approx(140 / 1.5)
    assert rates["fill"] == pytest.approx(340 / 600) and rates["timed_steps"] == 2


def test_flops_per_token():
    bench = load_script(SCRIPT)
    model = {"matmul_params": 1000, "layers": 2, "hidden": 8}
    assert bench.flops_per_token(model, 16.0) == 6 * 1000 + 12 * 2 * 8 * 16


def test_subset_fills_the_packed_steps_too():
    bench = load_script(SCRIPT)
    args = bench.parse_args(["--tokens", "10", "--min-steps", "2", "--eval-examples", "3"])
    lengths = [10] * 200  # ten examples per 100-token row: 2 packed steps of 8 rows take 151 examples
    held, train = bench.split_subset(lengths, 100, args)
    assert len(held) == 3 and not set(held) & set(train)
    assert len(train) == 151


@pytest.mark.slow  # ~40 s on 2 cores: three short training runs
def test_smoke_run_reports_all_three_sides(tmp_path):
    out = tmp_path / "sft.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for side in SIDES:
        assert side in result.stdout
    assert "packed/Trainer" in result.stdout and "summary" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    (res,) = report["results"]
    assert (res["dataset"], res["model"], res["cutoff"]) == ("alpaca", "small", 256)
    sides = res["summary"]["sides"]
    assert set(sides) == set(SIDES)
    for side in SIDES:
        s = sides[side]
        assert s["loss_tok_s"] > 0 and s["real_tok_s"] > 0 and 0 < s["mfu"] < 1
        assert math.isfinite(s["tail_loss"]) and math.isfinite(s["eval_loss"])
        assert 0 < s["fill"] <= 1
    # every side trained on the same tokens: the unpacked sides in the same number of steps, the packed in fewer
    assert sides["huayu"]["steps"] == sides["HF Trainer"]["steps"] >= sides["huayu --packing"]["steps"]
    assert sides["huayu --packing"]["fill"] > sides["HF Trainer"]["fill"]
