"""The one loop on accelerate: device and precision choices, the memory levers for large models,
and the clear errors where this machine cannot do what is asked (no CUDA here)."""

import json

import pytest
import torch
from conftest import write_conversations

from huayu.cli import main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sft(model_dir, data, out, *extra):
    return ["sft", "--model", model_dir, "--data", data, "--max-steps", "2", "--batch-size", "2", "--no-cache",
            "--out", str(out), *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--fp16"], "--fp16 is for GPUs"),
    (["--bf16", "--fp16", "--device", "cpu"], "exclude each other"),
    (["--finetuning-type", "lora", "--quantization-bit", "4"], "needs a CUDA GPU"),
    (["--quantization-bit", "4"], "--finetuning-type lora"),
    (["--finetuning-type", "lora", "--quantization-bit", "3"], "4 or 8"),
    (["--torch-dtype", "float64"], "--torch-dtype"),
    (["--attn-implementation", "fast"], "--attn-implementation"),
])
def test_what_this_machine_cannot_do_is_a_clear_error_before_any_work(flags, message, tmp_path, tiny_model_dir,
                                                                     capsys):
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(sft(tiny_model_dir, data, tmp_path / "out", *flags)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bf16_autocast_and_sdpa_train_on_the_cpu(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    assert main(sft(tiny_model_dir, data, out, "--device", "cpu", "--bf16", "--attn-implementation", "sdpa")) == 0
    assert json.loads((out / "train_result.json").read_text())["train_loss"] > 0


def test_gradient_checkpointing_lets_lora_train(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "lora"
    assert main(sft(tiny_model_dir, data, out, "--finetuning-type", "lora", "--gradient-checkpointing",
                    "--lr", "1e-2")) == 0
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # B starts at 0: it learned


def test_a_bf16_checkpoint_trains_with_fp32_master_weights_unless_pure_bf16(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from huayu.models.loading import load_model

    base = tmp_path / "bf16"
    load_model("tiny", tokenizer, seed=0).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(sft(str(base), data, tmp_path / "master")) == 0
    assert "fp32 master weights" in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "master").dtype == torch.float32
    assert main(sft(str(base), data, tmp_path / "pure", "--pure-bf16", "--bf16")) == 0
    assert "--pure-bf16" in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pure").dtype == torch.bfloat16


@needs_cuda
@pytest.mark.gpu
def test_sft_trains_on_the_gpu_in_bf16(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(sft(tiny_model_dir, data, tmp_path / "out", "--device", "cuda", "--bf16")) == 0


def test_with_bf16_autocast_only_the_trained_weights_get_fp32_masters(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from huayu.models.loading import load_model

    base = tmp_path / "bf16"
    load_model("tiny", tokenizer, seed=0).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(sft(str(base), data, tmp_path / "freeze", "--finetuning-type", "freeze",
                    "--freeze-trainable-layers", "1", "--bf16")) == 0
    dtypes = {k: v.dtype for k, v in load_file(tmp_path / "freeze" / "model.safetensors").items()}
    assert dtypes["model.layers.3.mlp.up_proj.weight"] == torch.float32  # trained: fp32 master
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16  # frozen: as loaded
