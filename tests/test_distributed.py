"""Data-parallel training under torchrun: 2 CPU processes (gloo) train like 1 process with the same
global batch, only rank 0 writes, and a 2-process run resumes exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEXTS, write_texts

from huayu.cli import main
from huayu.errors import HuayuError
from huayu.models.loading import ALLOW_PICKLE_ENV
from huayu.train import distributed, loop, parallel

GLOBAL_BATCH, STEPS = 4, 6
REPOSITORY = Path(__file__).parents[1]

# Runs a huayu command with an audit hook that records, per rank, every write (open for writing,
# mkdir, rename/replace, remove, rmtree) under the watched directories: a write by any rank but 0
# is then visible, and rank 0's record shows the hook does see the writes the loop makes.
RECORDING_LAUNCHER = r'''
import os, sys
WATCHED = [os.path.abspath(d) for d in os.environ["WATCHED_DIRS"].split(os.pathsep)]
RECORD = os.path.join(os.environ["WRITE_RECORDS"], "rank%s.txt" % os.environ.get("RANK", "0"))
PATH_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & WRITE_FLAGS):
            return
        paths = [path]
    elif event in PATH_EVENTS:
        paths = args[:2] if event == "os.rename" else args[:1]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if any(full == d or full.startswith(d + os.sep) for d in WATCHED):
                with open(RECORD, "a", encoding="utf-8") as f:
                    f.write(event + " " + full + "\n")


sys.addaudithook(hook)
from huayu.cli import main
sys.exit(main(sys.argv[1:]))
'''


def pretrain_args(tokenizer_dir, data, out, batch_size, extra=(), steps=STEPS):
    return ["pretrain", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", data, "--valid-data", data,
            "--seq-len", "16", "--batch-size", str(batch_size), "--max-steps", str(steps), "--log-every", "1",
            "--save-every", "3", "--warmup-steps", "2", "--out", str(out), *extra]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # free port


def launch(tmp_path, launcher_command, args, watched: list[Path], records: Path):
    """`huayu ARGS` in the processes `launcher_command` starts, their writes recorded."""
    launcher = tmp_path / "recording_launcher.py"
    launcher.write_text(RECORDING_LAUNCHER, encoding="utf-8")
    records.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "WATCHED_DIRS": os.pathsep.join(map(str, watched)), "WRITE_RECORDS": str(records)}
    proc = subprocess.run([*launcher_command, str(launcher), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPOSITORY)  # the shipped configs name files relative to it
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def torchrun(tmp_path, args, watched: list[Path], records: Path):
    return launch(tmp_path, TORCHRUN, args, watched, records)


def train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, STEPS + 1))
    return [r["train_loss"] for r in rows if "train_loss" in r]


def tree(out: Path) -> list[str]:
    """The files under `out`, TensorBoard's (named by host, time and pid) by kind only."""
    return sorted("runs/events" if p.parent.name == "runs" else str(p.relative_to(out))
                  for p in out.rglob("*") if p.is_file())


def written_by(records: Path, rank: int) -> str:
    path = records / f"rank{rank}.txt"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def two_processes_and_one(tmp_path, tokenizer_dir, extra: list[str]):
    """A 2-process run and a 1-process run of the same global batch, their per-step training and
    final validation losses compared; (data, cache, the 2-process output, its write records)."""
    # 64 copies of the corpus: a token count that is a multiple of 16 x 4, so every block is full
    data = write_texts(tmp_path / "t.txt", TEXTS * 64)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(pretrain_args(tokenizer_dir, data, single, GLOBAL_BATCH)) == 0
    cache, records = tmp_path / "multi-cache", tmp_path / "writes"  # a cache of its own: rank 0 must build it
    args = pretrain_args(tokenizer_dir, data, multi, GLOBAL_BATCH // 2, ["--cache-dir", str(cache), *extra])
    torchrun(tmp_path, args, [multi, cache], records)
    difference = max(abs(a - b) for a, b in zip(train_losses(single), train_losses(multi)))
    print(f"{' '.join(extra) or 'DDP'}: max train-loss difference over {STEPS} steps: {difference:.2e}")
    assert difference < 1e-4
    assert json.loads((multi / "train_result.json").read_text())["eval_loss"] == pytest.approx(
        json.loads((single / "train_result.json").read_text())["eval_loss"], abs=1e-4)
    return data, cache, multi, records


def resumed_at_step_3(tmp_path, tokenizer_dir, data, cache, run: Path, extra: list[str]):
    """`run` as if killed after its step-3 checkpoint, continued by 2 processes again; (its
    output, the launch, its write records)."""
    resumed, records = tmp_path / "resumed", tmp_path / "resume-writes"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    (resumed / "train_result.json").unlink()
    proc = torchrun(tmp_path, pretrain_args(tokenizer_dir, data, resumed, GLOBAL_BATCH // 2,
                                            ["--cache-dir", str(cache), *extra, "--resume"]), [resumed, cache], records)
    assert "resuming from" in proc.stdout and "step 3 of 6" in proc.stdout
    assert train_losses(resumed) == pytest.approx(train_losses(run), abs=1e-5)
    return resumed, records


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tokenizer_dir):
    data, cache, ddp, records = two_processes_and_one(tmp_path, tokenizer_dir, [])
    assert written_by(records, 1) == ""
    assert tree(ddp) == tree(tmp_path / "single")
    assert not [p for p in ddp.rglob("*") if ".tmp" in p.name]
    assert "model.safetensors" in written_by(records, 0) and "blocks-" in written_by(records, 0)
    _, records = resumed_at_step_3(tmp_path, tokenizer_dir, data, cache, ddp, [])
    assert written_by(records, 1) == "" and "step-6" in written_by(records, 0)


def test_ranks_share_out_the_batches_one_process_would_take(monkeypatch):
    """Each global micro-batch is one process's batch of batch_size x world size, cut into
    consecutive shares; an epoch's tail too short to share is topped up so every rank gets one."""
    n, world, micro_batches = 9, 2, 8  # 3 global micro-batches per epoch, the last of 1 example

    def first_batches(batch_size):
        return [idx for _, (_, idx) in zip(range(micro_batches), loop._batches(n, loop.TrainArgs(batch_size=batch_size,
                                                                                               seed=3), 0))]

    single = first_batches(2 * world)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(first_batches(2))
    for whole, first, second in zip(single, *shares):
        if len(whole) >= world:
            assert first + second == whole
        else:  # the tail: its example, and one from the start of the epoch's order
            assert first == whole and len(second) == 1
    assert loop.total_steps(n, loop.TrainArgs(batch_size=2, epochs=2)) == 6  # 2 epochs of 3 global micro-batches


def test_accelerate_launch_multi_gpu_runs_the_same_ddp_on_cpu(tmp_path, tokenizer_dir):
    """`accelerate launch --multi_gpu` starts torchrun, so its processes train together (gloo on
    CPU here); `--cpu` would start a single process."""
    data, out = write_texts(tmp_path / "t.txt", TEXTS * 64), tmp_path / "out"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0"]
    records = tmp_path / "writes"
    args = pretrain_args(tokenizer_dir, data, out, GLOBAL_BATCH // 2, steps=2)
    proc = launch(tmp_path, accelerate, args, [out], records)
    assert "2 processes x 2 examples" in proc.stdout
    assert json.loads((out / "train_result.json").read_text())["steps"] == 2
    assert written_by(records, 1) == "" and "model.safetensors" in written_by(records, 0)


@pytest.mark.parametrize("config, says", [("fsdp", "FSDP: parameters, gradients and optimiser state sharded over 2"),
                                          ("zero3", "DeepSpeed ZeRO-3 over 2 processes")])
def test_accelerate_launch_with_a_shipped_config_shards_the_model(tmp_path, tokenizer_dir, config, says):
    data, out = write_texts(tmp_path / "t.txt", TEXTS * 64), tmp_path / "out"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPOSITORY / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
                  "--main_process_port", "0"]
    proc = launch(tmp_path, accelerate, pretrain_args(tokenizer_dir, data, out, GLOBAL_BATCH // 2, steps=2), [out],
                  tmp_path / "writes")
    assert says in proc.stdout
    assert json.loads((out / "train_result.json").read_text())["steps"] == 2


@pytest.mark.parametrize("stage, accumulation", [(2, ["--batch-size", "1", "--grad-accum", "2"]), (3, [])])
def test_deepspeed_zero_over_two_processes_trains_like_one_and_resumes(tmp_path, tokenizer_dir, stage,
                                                                        accumulation):
    """DeepSpeed ZeRO-2 (here with accumulation over 2 micro-batches) and ZeRO-3 through accelerate,
    DeepSpeed's CPU build on gloo: the one-process losses with the shipped configs; the final model
    is whole and loads with plain transformers; a checkpoint is DeepSpeed's own, which resumes
    exactly with --allow-pickle-weights (and not without it)."""
    from transformers import AutoModelForCausalLM

    config = str(REPOSITORY / "examples" / "deepspeed" / f"zero{stage}.json")
    data, cache, run, _ = two_processes_and_one(tmp_path, tokenizer_dir, ["--deepspeed", config, *accumulation])
    plain = AutoModelForCausalLM.from_pretrained(run)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    assert max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), reference.parameters())) < 1e-3
    step = run / "checkpoints" / "step-3"
    assert (step / "deepspeed").is_dir() and not (step / "model.safetensors").exists()
    assert parallel.checkpoint_layout(step) == {"kind": "deepspeed", "processes": 2, "stage": stage}
    resumed_at_step_3(tmp_path, tokenizer_dir, data, cache, run,
                      ["--deepspeed", config, *accumulation, "--allow-pickle-weights"])


def test_a_deepspeed_checkpoint_resumes_only_with_the_pickle_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(HuayuError, match="DeepSpeed checkpoint, whose files are pickles.*--allow-pickle-weights"):
        parallel.DeepSpeedZeRO.load(None, tmp_path, {})


def test_a_deepspeed_config_may_not_contradict_huayus_flags(tmp_path):
    """huayu owns the batch, accumulation, clipping, optimiser and schedule: a config file that
    sets them otherwise is an error, not silently one or the other."""
    from types import SimpleNamespace

    def layout(config: dict):
        plugin = SimpleNamespace(deepspeed_config=config)
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
        return parallel.DeepSpeedZeRO(accelerator, loop.TrainArgs(batch_size=2, grad_accum=4, max_grad_norm=1.0))

    filled = layout({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"})
    assert filled.config["train_micro_batch_size_per_gpu"] == 2 and filled.config["gradient_accumulation_steps"] == 4
    assert filled.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert filled.everyone_validates
    with pytest.raises(HuayuError, match="gradient_accumulation_steps 8.*--grad-accum"):
        layout({"gradient_accumulation_steps": 8})
    with pytest.raises(HuayuError, match="'optimizer' section"):
        layout({"optimizer": {"type": "AdamW"}})


def test_fsdp_over_two_processes_trains_like_one_and_resumes(tmp_path, tokenizer_dir):
    """FSDP2 on gloo: parameters, gradients and optimiser state sharded over 2 processes give the
    one-process losses; each rank writes its shard of a checkpoint (safetensors, no pickle), which
    resumes exactly, and the final model is whole and loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    data, cache, fsdp, records = two_processes_and_one(tmp_path, tokenizer_dir, ["--fsdp"])
    step = fsdp / "checkpoints" / "step-3"
    assert sorted(p.name for p in (step / "shards").iterdir()) == [
        f"rank-0000{r}-of-00002.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
    assert not (step / "model.safetensors").exists() and not list(step.rglob("*.pt")) and not list(step.rglob("*.bin"))
    rank1 = written_by(records, 1).splitlines()
    mine = ("/shards/rank-00001-of-00002.", "/shards/.tmp-rank-00001-of-00002.")
    assert all(line.endswith("/shards") or any(m in line for m in mine) for line in rank1), rank1
    plain = AutoModelForCausalLM.from_pretrained(fsdp)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    assert max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), reference.parameters())) < 1e-3
    resumed_at_step_3(tmp_path, tokenizer_dir, data, cache, fsdp, ["--fsdp"])
