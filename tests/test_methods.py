"""Fine-tuning methods (full, lora, prefix, freeze): what they train, what they save, how adapters
load, merge, resume and chat. Each method is trained once (a few steps of `huayu sft` on the tiny
model) and the in-memory model is kept, by wrapping the loop's `fit`, to compare against."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_conversations

from huayu.cli import main
from huayu.errors import HuayuError
from huayu.train import stage

STEPS = 6
# method -> (learning rate, which parameter names it may train)
METHODS = {
    "full": ("3e-3", lambda name: True),
    "lora": ("1e-2", lambda name: "lora_A" in name or "lora_B" in name),
    "prefix": ("3e-2", lambda name: "prompt_encoder" in name),
    "freeze": ("3e-3", lambda name: name.startswith(("model.layers.2.", "model.layers.3."))),  # last 2 of 4
}


def sft_args(model, data, out, method, *extra):
    return ["sft", "--model", model, "--data", data, "--finetuning-type", method, "--lr", METHODS[method][0],
            "--schedule", "constant", "--max-steps", str(STEPS), "--save-every", "3", "--batch-size", "2",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "d.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    """method -> a dict of its run: out, the trained model in memory, its parameters before
    training and the training-set loss before and after. Each method trains on first use."""
    from huayu.train.loop import evaluate_loss

    runs = {}

    def run(method: str) -> dict:
        if method in runs:
            return runs[method]
        captured, real_fit = {"out": tmp_path_factory.mktemp(method) / "out"}, stage.fit

        def fit(model, tokenizer, examples, collate, *args, **kwargs):
            captured.update(model=model, before={n: p.detach().clone() for n, p in model.named_parameters()},
                            loss_before=evaluate_loss(model, examples, collate))
            result = real_fit(model, tokenizer, examples, collate, *args, **kwargs)
            captured["loss_after"] = evaluate_loss(model, examples, collate)
            model.eval()
            return result

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stage, "fit", fit)
            assert main(sft_args(tiny_model_dir, data, captured["out"], method)) == 0
        runs[method] = captured
        return captured

    return run


def logits(model, text_ids=(5, 9, 12, 7, 3, 20)):
    ids = torch.tensor([list(text_ids)])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("method", METHODS)
def test_a_method_lowers_the_loss_and_trains_only_its_parameters(method, trained):
    run = trained(method)
    assert run["loss_after"] < run["loss_before"] - 0.05
    params = dict(run["model"].named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    changed = {n for n, p in params.items() if not torch.equal(p, run["before"][n])}
    assert trainable and changed == trainable
    assert all(METHODS[method][1](n) for n in trainable), sorted(trainable)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # plain peft's own
@pytest.mark.parametrize("method", METHODS)
def test_the_output_loads_back_with_the_same_logits(method, trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huayu.models.loading import load_for_inference

    run = trained(method)
    out, expected = run["out"], logits(run["model"])
    adapter = method in ("lora", "prefix")
    files = {p.name for p in out.iterdir()}
    assert ("adapter_model.safetensors" in files) == adapter and ("model.safetensors" in files) == (not adapter)
    assert AutoTokenizer.from_pretrained(out).chat_template
    if adapter:  # plain peft on the base, as a user without huayu would load it
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    else:
        plain = AutoModelForCausalLM.from_pretrained(out)
    _, ours = load_for_inference(str(out))  # an adapter directory names its base itself
    for model in (plain, ours):
        torch.testing.assert_close(logits(model.eval()), expected, atol=1e-5, rtol=0)


def test_merge_gives_the_same_logits_and_greedy_replies(trained, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from huayu.generation import Generator

    lora = trained("lora")
    merged = tmp_path / "merged"
    assert main(["export", "merge", tiny_model_dir, str(lora["out"]), "--out", str(merged)]) == 0
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "huayu_export.yaml"} <= {
        p.name for p in merged.iterdir()}
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not torch.allclose(logits(plain), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    torch.testing.assert_close(logits(plain), logits(lora["model"]), atol=1e-4, rtol=0)
    adapted = Generator.load(tiny_model_dir, adapter=str(lora["out"]))
    # min_new_tokens: the tiny model's first greedy token is often EOS, which would compare nothing
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=adapted.tokenizer.pad_token_id)
    for text in ("你好", "你是谁？"):
        ids = torch.tensor([adapted.encode_chat([{"role": "user", "content": text}])])
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert torch.equal(plain.generate(**inputs, **greedy), adapted.model.generate(**inputs, **greedy))

    assert main(["export", "merge", tiny_model_dir, str(trained("prefix")["out"]), "--out", str(tmp_path / "p")]) == 1
    assert "cannot be merged" in capsys.readouterr().err


def test_an_adapter_on_the_wrong_base_is_a_clear_error(trained, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from huayu.generation import Generator

    def other_base(name, vocab_size):
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2)).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    adapter = str(trained("lora")["out"])
    # its vocabulary is smaller than the adapter's tokenizer too: the base mismatch is still what is reported
    with pytest.raises(HuayuError, match="was trained on base .*hidden size 128.* is llama, 2 layers, hidden size 64"):
        Generator.load(other_base("small", 50), adapter=adapter)
    moved = tmp_path / "moved"  # its recorded base is gone: peft's own shape error, explained
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone"}))
    with pytest.raises(HuayuError, match="not available here.*hidden size 64.*size mismatch"):
        Generator.load(other_base("other", 400), adapter=str(moved))
    with pytest.raises(HuayuError, match="pass the base model and the adapter"):
        Generator.load(str(moved))


@pytest.mark.parametrize("method", ["lora", "prefix", "freeze"])
def test_a_run_resumes_exactly(method, trained, tiny_model_dir, data, tmp_path, capsys):
    from safetensors.torch import load_file

    run = trained(method)
    resumed = tmp_path / "resumed"
    shutil.copytree(run["out"], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")  # as if killed after the checkpoint at step 3
    (resumed / "train_result.json").unlink()
    assert main(sft_args(tiny_model_dir, data, resumed, method, "--resume", "--lora-rank", "4")) == 1
    assert "--lora-rank 8 -> 4" in capsys.readouterr().err
    assert main(sft_args(tiny_model_dir, data, resumed, method, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    first, second = (json.loads((d / "train_result.json").read_text()) for d in (run["out"], resumed))
    assert second["train_loss"] == pytest.approx(first["train_loss"], abs=1e-5)
    weights = "model.safetensors" if method == "freeze" else "adapter_model.safetensors"
    a, b = (load_file(d / weights) for d in (run["out"], resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_chat_with_an_adapter(trained, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", tiny_model_dir, "--adapter",
                           str(trained("lora")["out"]), "--max-new-tokens", "4"], input="你好\n你是谁？\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2


@pytest.mark.parametrize("flags, message", [
    (["--finetuning-type", "adapter"], "--finetuning-type must be one of full, lora, prefix, freeze"),
    (["--finetuning-type", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--finetuning-type", "lora", "--lora-target", "no_such_proj"], "--lora-target: peft cannot adapt"),
    (["--finetuning-type", "freeze", "--freeze-trainable-layers", "0"], "trains nothing"),
    (["--finetuning-type", "freeze", "--freeze-trainable-layers", "9"], "the model has only 4 layers"),
    (["--finetuning-type", "freeze", "--freeze-trainable-modules", "no_such"], "'no_such' matches no parameter"),
    (["--finetuning-type", "prefix", "--model", "tiny"], "needs a trained base model directory"),
])
def test_bad_options_are_clear_errors(flags, message, tiny_model_dir, tokenizer_dir, data, tmp_path, capsys):
    args = ["sft", "--model", tiny_model_dir, "--tokenizer", tokenizer_dir, "--data", data, "--max-steps", "1",
            "--out", str(tmp_path / "out"), *flags]
    assert main(args) == 1
    assert message in capsys.readouterr().err


def test_default_lora_targets_come_from_the_family_or_all_linear_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from huayu.train.methods import FinetuningArgs, apply_finetuning

    def adapted(model, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. peft's fan_in_fan_out correction for Conv1D
            peft_model = apply_finetuning(model, FinetuningArgs("lora", **options))
        return {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}, peft_model

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    names, peft_model = adapted(gpt2)
    assert names == {"c_attn"} and peft_model.peft_config["default"].fan_in_fan_out
    assert adapted(AutoModelForCausalLM.from_pretrained(tiny_model_dir))[0] == {"q_proj", "k_proj", "v_proj", "o_proj"}
    names, _ = adapted(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_target=["all-linear"])
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
