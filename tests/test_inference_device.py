"""Inference on the model's device: every tensor huayu makes to decode (inputs, masks, positions,
key/value caches, sampling tensors) is made there, so a model on a GPU never waits on a copy from
the CPU; `--device`, `--torch-dtype` and `--quantization-bit` reach every command that loads a
model to generate, with clear errors where the machine cannot do what they ask.

Without a GPU the device itself cannot differ, so the first test watches the tensor factories: a
call from huayu's code that names no device would make its tensor on the CPU whatever the model's
device. The `gpu` tests run the same paths on CUDA where there is one (benchmarks/gpu_check.py too).
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import write_conversations
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from huayu.cli import main
from huayu.generation import DecodingArgs, Generator
from huayu.serve.engine import Engine, Request
from huayu.serve.sampling import SamplingParams

HUAYU = str(Path(__file__).resolve().parents[1] / "huayu")


class DevicelessFactories(TorchFunctionMode):
    """Records every tensor factory (torch.tensor, arange, zeros, ...) called from huayu's own code
    without a device (the *_like ones take their input's)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.factories = {f for f in _device_constructors() if not f.__name__.endswith("_like")}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame and frame.f_code.co_filename.startswith(HUAYU):
                self.calls.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **kwargs)


def test_decoding_makes_its_tensors_on_the_models_device(lively_model_dir):
    gen = Generator.load(lively_model_dir, placement=None)
    prompts = [gen.encode_text(t) for t in ("你好", "今天天气怎么样？")]
    sampled = DecodingArgs(max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, repetition_penalty=1.3)
    with DevicelessFactories() as watch:
        gen.new_ids(prompts, DecodingArgs(max_new_tokens=4))                       # huayu's own loop, greedy
        gen.new_ids(prompts, sampled)                                              # sampled, penalised
        gen.new_ids(prompts, DecodingArgs(max_new_tokens=4, num_beams=2))          # transformers' generate()
        "".join(gen.stream_ids(prompts[0], DecodingArgs(max_new_tokens=4)))
        engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, max_batch_size=4)
        first = Request(prompts[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), lambda e: None)
        engine.submit(first)
        engine.step()
        engine.submit(Request(prompts[1], SamplingParams(temperature=0.8, top_k=4, seed=7, max_tokens=3,
                                                         presence_penalty=0.5), lambda e: None))  # joins mid-flight
        while engine.step():
            pass
    assert watch.calls == []


def test_the_watch_sees_a_factory_without_a_device():
    """The test above could not fail if the watch missed huayu's calls: it sees this module's."""
    global HUAYU
    saved, HUAYU = HUAYU, str(Path(__file__).resolve().parent)
    try:
        with DevicelessFactories() as watch:
            torch.tensor([1, 2])
            torch.arange(3, device="cpu")
        assert len(watch.calls) == 1 and watch.calls[0].startswith("tensor at ")
    finally:
        HUAYU = saved


@pytest.mark.parametrize("command, config", [("chat", "huayu.chat:ChatConfig"),
                                             ("generate", "huayu.generation_command:GenerateConfig"),
                                             ("eval", "huayu.evaluation.evaluate:EvalConfig"),
                                             ("serve", "huayu.serve.server:ServeConfig"),
                                             ("webui", "huayu.serve.webui:WebUIConfig")])
def test_every_generating_command_takes_the_device_and_loading_flags(command, config):
    import importlib

    from huayu.cli import build_parser
    from huayu.config import config_from_args
    from huayu.models.loading import InferenceArgs

    module, name = config.split(":")
    args = build_parser(command).parse_args(["M", "--device", "cpu", "--torch-dtype", "bfloat16",
                                             "--attn-implementation", "sdpa", "--quantization-bit", "4"])
    cfg = config_from_args(getattr(importlib.import_module(module), name), args)
    assert cfg.placement == InferenceArgs(device="cpu", torch_dtype="bfloat16", attn_implementation="sdpa",
                                          quantization_bit=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("flags, says", [(["--device", "cuda"], "--device cuda, but torch sees no CUDA GPU"),
                                         (["--quantization-bit", "4"], "needs a CUDA GPU")])
def test_what_needs_cuda_is_a_clear_error_without_it(tmp_model_and_data, capsys, flags, says):
    model, data, out = tmp_model_and_data
    assert main(["eval", model, "--data", data, "--max-new-tokens", "2", "--out", out, *flags]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.fixture
def tmp_model_and_data(lively_model_dir, tmp_path):
    return lively_model_dir, write_conversations(tmp_path / "d.jsonl"), str(tmp_path / "eval")


def test_bf16_weights_chat_in_bf16(lively_model_dir, tmp_path):
    """--torch-dtype bfloat16 loads (and decodes) in bf16, on this CPU as on a GPU."""
    import huayu

    model = huayu.load(lively_model_dir, dtype="bfloat16", device="cpu")
    assert model.generator.model.dtype == torch.bfloat16
    reply, _ = model.chat("你好", max_new_tokens=4)
    assert isinstance(reply, str)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_decoding_and_the_engine_give_the_cpus_greedy_tokens(lively_model_dir):
    cpu = Generator.load(lively_model_dir, placement=None)
    import huayu

    cuda = huayu.load(lively_model_dir, device="cuda").generator
    assert cuda.device.type == "cuda"
    prompts = [cpu.encode_text(t) for t in ("你好", "今天天气怎么样？")]
    greedy = DecodingArgs(max_new_tokens=8)
    assert cuda.new_ids(prompts, greedy) == cpu.new_ids(prompts, greedy)
    engine = Engine(cuda.model, cuda.tokenizer, cuda.eos_ids, cuda.max_positions)
    out = []
    engine.submit(Request(prompts[0], SamplingParams(temperature=0.7, seed=3, max_tokens=8), out.append))
    while engine.step():
        pass
    assert out and out[-1].finish_reason
