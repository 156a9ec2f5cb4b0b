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


# A checkpoint whose model type transformers does not ship, built by its own code (as ChatGLM3's is):
# a Llama under another name, in the files config.json's auto_map names. Importing them leaves a mark.
CUSTOM_CODE = {
    "configuration_tiny.py": """from transformers import LlamaConfig

open({marker!r}, "a").write("configuration\\n")


class TinyConfig(LlamaConfig):
    model_type = "tiny_remote"
""",
    "modeling_tiny.py": """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
""",
    "tokenization_tiny.py": """from transformers import PreTrainedTokenizerFast

open({marker!r}, "a").write("tokenization\\n")


class TinyTokenizer(PreTrainedTokenizerFast):
    pass
""",
}


def _update_json(path, **values) -> dict:
    import json

    data = {**json.loads(path.read_text(encoding="utf-8")), **values}
    path.write_text(json.dumps(data), encoding="utf-8")
    return data


def custom_code_checkpoint(path, tokenizer, marker) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    for name, code in CUSTOM_CODE.items():
        (path / name).write_text(code.format(marker=str(marker)), encoding="utf-8")
    _update_json(path / "config.json", model_type="tiny_remote", architectures=["TinyForCausalLM"],
                 auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                           "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    _update_json(path / "tokenizer_config.json", tokenizer_class="TinyTokenizer",
                 auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]})
    return str(path)


def test_a_checkpoints_own_code_runs_only_with_trust_remote_code(tmp_path, tokenizer, monkeypatch, capsys):
    import io
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from huayu.models.loading import TRUST_REMOTE_CODE_ENV

    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "0")  # restored after the test, whatever the flag sets
    marker = tmp_path / "code-ran"
    model = custom_code_checkpoint(tmp_path / "m", tokenizer, marker)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    # piped, as a user's first chat line would be: nothing may read it as an answer to a prompt
    refused = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", model], input="y\n你好\n", env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and not refused.stdout
    assert refused.stderr.splitlines() == [
        f"huayu chat: error: '{model}' needs its own Python code to load (model type 'tiny_remote': "
        "configuration_tiny.py, modeling_tiny.py), which huayu runs only when told to: pass --trust-remote-code "
        f"(or set {TRUST_REMOTE_CODE_ENV}=1) if you trust that code"]
    assert not marker.exists()
    tokenizer_only = tmp_path / "tokenizer"  # a known model type whose tokenizer is its own code
    shutil.copytree(model, tokenizer_only)
    _update_json(tokenizer_only / "config.json", model_type="llama", auto_map={})
    assert main(["chat", str(tokenizer_only)]) == 1
    assert "(tokenizer TinyTokenizer: tokenization_tiny.py)" in capsys.readouterr().err
    _update_json(tokenizer_only / "config.json", model_type="no_such_model")
    assert main(["chat", str(tokenizer_only), "--trust-remote-code"]) == 1  # no code to trust: the flag cannot help
    assert "model type 'no_such_model', which transformers" in capsys.readouterr().err
    assert not marker.exists()

    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", model, "--trust-remote-code", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one reply to the one line
    assert set(marker.read_text().split()) == {"configuration", "tokenization"}  # its model and its tokenizer
