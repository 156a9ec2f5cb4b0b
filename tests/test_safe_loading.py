"""Nothing a user could plant in a checkpoint or model directory runs code when huayu loads it."""

import pickle

import torch
from conftest import write_conversations, write_texts

from huayu.cli import main
from huayu.train.state import LEGACY_PICKLE, load_state, save_state


class Planted:
    """What an attacker pickles: unpickling it calls `touch` on a file of their choosing."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    import random

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    state = {"step": 7, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng_by_rank": [{"torch": torch.get_rng_state(), "python": random.getstate()}]}
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    back = load_state(tmp_path)
    assert back["step"] == 7 and back["rng_by_rank"][0]["python"] == random.getstate()
    assert torch.equal(back["rng_by_rank"][0]["torch"], torch.get_rng_state())
    assert back["scheduler"] == sched.state_dict()
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    opt.load_state_dict(back["optimizer"])  # what resume does with it


def test_a_planted_pickle_trainer_state_is_refused_not_run(tmp_path, tokenizer_dir, capsys):
    data = write_texts(tmp_path / "t.txt")
    out = tmp_path / "pt"
    args = ["pretrain", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", data, "--seq-len", "16",
            "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--out", str(out)]
    assert main(args) == 0
    step = out / "checkpoints" / "step-4"
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (step / name).unlink()
    marker = tmp_path / "pwned"
    (step / LEGACY_PICKLE).write_bytes(pickle.dumps({"step": Planted(marker)}))
    assert main(args + ["--max-steps", "6", "--resume"]) == 1
    assert not marker.exists(), "the planted pickle ran"
    assert "could run code" in capsys.readouterr().err


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from huayu.models.loading import ALLOW_PICKLE_ENV

    monkeypatch.setenv(ALLOW_PICKLE_ENV, "0")  # restored after the test, whatever the flag sets
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    data = write_conversations(tmp_path / "d.jsonl")
    common = ["--max-new-tokens", "2", "--out", str(tmp_path / "ev")]
    assert main(["eval", str(model_dir), "--data", data, *common]) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "--allow-pickle-weights" in err
    assert main(["eval", str(model_dir), "--data", data, *common, "--allow-pickle-weights"]) == 0
