"""`huayu quantize`: the int8/int4 kernels against dequantized weights, a trained model kept close
(greedy agreement, perplexity), every generative family, every inference stage, and clear errors."""

import json
import math

import pytest
import torch
from conftest import TEXTS, save_preset, write_conversations, write_texts

import huayu
from huayu.cli import main
from huayu.errors import HuayuError
from huayu.quantization import QuantizedLinear, pack_nibbles, quantize_linear, unpack_nibbles

PROMPTS = ["春天来了，", "我们一起", "学习使人", "问题和", "读书让人"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A tiny decoder trained until it has learned the fixture texts, so that quantization error
    shows up in what it predicts."""
    tmp = tmp_path_factory.mktemp("quant")
    out = tmp / "model"
    assert main(["pretrain", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", write_texts(tmp / "t.txt"),
                 "--seq-len", "32", "--batch-size", "8", "--max-steps", "80", "--lr", "3e-3", "--warmup-steps", "5",
                 "--log-every", "1000", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    dirs = {}
    for bits in (8, 4):
        dirs[bits] = str(tmp_path_factory.mktemp(f"int{bits}") / "q")
        assert main(["quantize", trained, "--bits", str(bits), "--out", dirs[bits]]) == 0
    return dirs


def _dequantized(q: QuantizedLinear) -> torch.Tensor:
    if q.bits == 8:
        return q.qweight.float() * q.scales[:, None]
    values = unpack_nibbles(q.qweight).float().reshape(q.out_features, -1, q.group_size)
    scales, zeros = q.scales.t()[..., None], q.zeros.t()[..., None]
    return ((values - 8) * scales + zeros).reshape(q.out_features, q.in_features)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_compute_x_times_the_dequantized_weights(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 72)  # 72 rows: int4 pads them to a multiple of 16 for the kernel
    q = quantize_linear(linear, bits, 32 if bits == 4 else None)
    x = torch.randn(3, 5, 128)
    w = _dequantized(q)
    torch.testing.assert_close(q(x), x @ w.t() + linear.bias.detach(), atol=1e-4, rtol=1e-4)
    error = (w - linear.weight.detach()).abs()
    if bits == 8:  # half a step of a row's 255 levels
        assert (error <= linear.weight.abs().amax(1, keepdim=True) / 254 + 1e-6).all()
    else:  # half a step of a group's 16 levels
        assert (error <= q.scales.t().repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_nibble_packing_round_trips():
    values = torch.randint(0, 16, (6, 64), dtype=torch.int32)
    packed = pack_nibbles(values)
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), values)


def _perplexity(model, tokenizer, texts) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def test_quantized_models_stay_close_to_full_precision(trained, quantized):
    """Bounds: int8 matches every greedy token and is within 1 % in perplexity; int4 matches ≥ 80 %
    of the tokens and is within 10 %."""
    full = huayu.load(trained)
    reference = full.generate(PROMPTS, max_new_tokens=12)
    ppl = _perplexity(full.model, full.tokenizer, TEXTS)
    for bits, tokens_agree, ppl_bound in ((8, 1.0, 0.01), (4, 0.8, 0.10)):
        model = huayu.load(quantized[bits])
        layers = [m for m in model.model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 4 * 7 + 1 and {m.bits for m in layers} == {bits}  # 4 layers + lm_head
        out = model.generate(PROMPTS, max_new_tokens=12)
        agree = sum(a == b for x, y in zip(out, reference) for a, b in zip(x, y)) / sum(map(len, reference))
        assert agree >= tokens_agree, (bits, out, reference)
        assert abs(_perplexity(model.model, model.tokenizer, TEXTS) / ppl - 1) <= ppl_bound


def test_quantized_files(trained, quantized):
    from pathlib import Path

    sizes = {bits: Path(d, "model.safetensors").stat().st_size for bits, d in quantized.items()}
    assert sizes[4] < sizes[8] < Path(trained, "model.safetensors").stat().st_size
    config = json.loads(Path(quantized[4], "config.json").read_text(encoding="utf-8"))
    assert config["huayu_quantization"]["bits"] == 4 and config["huayu_quantization"]["group_size"] == 32
    assert Path(quantized[4], "tokenizer.json").exists() and Path(quantized[4], "huayu_export.yaml").exists()


def test_chat_eval_and_serve_take_a_quantized_model(quantized, tmp_path, monkeypatch, capsys):
    import io

    from fastapi.testclient import TestClient

    from huayu.serve.server import ServeConfig, build_service, create_app

    model = quantized[4]
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", model, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(["eval", model, "--data", data, "--general-data", write_texts(tmp_path / "g.txt"),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert math.isfinite(metrics["ppl"]) and math.isfinite(metrics["general_loss"])
    with TestClient(create_app(build_service(ServeConfig(model=model)))) as client:
        reply = client.post("/v1/chat/completions", json={"model": "q", "messages": [{"role": "user", "content": "你好"}],
                                                          "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantizing_on_loading(lively_model_dir, quantization):
    model = huayu.load(lively_model_dir, quantization=quantization)
    assert sum(isinstance(m, QuantizedLinear) for m in model.model.modules()) == 4 * 7 + 1
    assert model.generate("春天来了，", max_new_tokens=4)[0]
    with pytest.raises(HuayuError, match="quantization must be one of int8, int4"):
        huayu.load(lively_model_dir, quantization="int3")


def _gpt2(tokenizer, path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["gpt2", "t5-tiny", "glm-tiny"])
def test_every_generative_family(family, tokenizer, glm_tokenizer, tmp_path):
    """GPT-2's Conv1D layers, T5's encoder, decoder and shared embeddings, GLM: logits near the
    full-precision ones (relative error of random weights: int8 < 2 %, int4 < 25 %), and text."""
    if family == "gpt2":
        source = _gpt2(tokenizer, tmp_path / "m")
    else:
        source = save_preset(family, glm_tokenizer if family.startswith("glm") else tokenizer, tmp_path / "m")
    full = huayu.load(source)
    inputs = full.tokenizer(["春天来了，花都开了。"], return_tensors="pt")
    extra = {"decoder_input_ids": inputs["input_ids"][:, :3]} if family.startswith("t5") else {}
    with torch.no_grad():
        reference = full.model(**inputs, **extra).logits
    for bits, bound in ((8, 0.02), (4, 0.25)):
        assert main(["quantize", source, "--bits", str(bits), "--out", str(tmp_path / f"q{bits}")]) == 0
        small = huayu.load(str(tmp_path / f"q{bits}"))
        assert sum(isinstance(m, QuantizedLinear) for m in small.model.modules()) > 0
        with torch.no_grad():
            logits = small.model(**inputs, **extra).logits
        assert (logits - reference).norm() / reference.norm() < bound, bits
        assert isinstance(small.generate("春天", max_new_tokens=3)[0], str)


def test_bad_requests_are_clear_errors(trained, quantized, tokenizer, tmp_path, capsys):
    def fails(args, message):
        assert main(args) == 1
        assert message in capsys.readouterr().err

    fails(["quantize", trained, "--bits", "3", "--out", str(tmp_path / "a")], "--bits must be 8 or 4")
    fails(["quantize", trained, "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "a")],
          "--group-size must be one of 32, 64, 128, 256")
    fails(["quantize", quantized[8], "--out", str(tmp_path / "a")], "already quantized")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine", encoding="utf-8")
    fails(["quantize", trained, "--out", str(tmp_path / "taken")], "is not empty")
    encoder = save_preset("bert-tiny", tokenizer, tmp_path / "bert")
    fails(["quantize", encoder, "--out", str(tmp_path / "a")], "does not generate text")
    data = write_conversations(tmp_path / "d.jsonl")
    fails(["sft", "--model", quantized[8], "--data", data, "--out", str(tmp_path / "sft")], "for inference only")
    assert not (tmp_path / "a").exists()
