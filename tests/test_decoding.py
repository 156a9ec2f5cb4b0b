"""huayu's own decoding loop for decoder-only models: the same greedy tokens as transformers'
`generate()` (batched, left-padded, with a LoRA adapter, compiled or not), streaming, sampling,
and the models and options that go through `generate()` instead."""

import pytest
import torch

from huayu.generation import DecodingArgs, Generator

PROMPTS = ["春天来了，", "我们", "学习使人进步，读书"]  # different lengths: left padding


def _generate_ids(gen: Generator, prompts, d: DecodingArgs):
    """What transformers' generate() decodes, the reference."""
    loop, gen.loop = gen.loop, None
    try:
        return gen.new_ids(prompts, d)
    finally:
        gen.loop = loop


@pytest.fixture(scope="module")
def gen(lively_model_dir):
    return Generator.load(lively_model_dir)


def _prompts(gen):
    return [gen.encode_text(p) for p in PROMPTS]


def test_own_loop_decodes_what_generate_decodes(gen):
    d = DecodingArgs(max_new_tokens=24)
    assert gen.loop is not None
    ours = gen.new_ids(_prompts(gen), d)
    assert ours == _generate_ids(gen, _prompts(gen), d)
    assert all(len(row) > 5 for row in ours)
    assert [gen.new_ids([p], d)[0] for p in _prompts(gen)] == ours  # each row as it would alone


def test_compiled_loop_decodes_the_same(gen):
    d = DecodingArgs(max_new_tokens=16, compile=True)
    assert gen.new_ids(_prompts(gen), d) == _generate_ids(gen, _prompts(gen), DecodingArgs(max_new_tokens=16))
    assert gen.loop.compiled


def test_with_a_lora_adapter(lively_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)) \
        .save_pretrained(tmp_path / "lora")
    gen = Generator.load(lively_model_dir, adapter=str(tmp_path / "lora"))
    plain = Generator.load(lively_model_dir)
    d = DecodingArgs(max_new_tokens=12)
    ours = gen.new_ids(_prompts(gen), d)
    assert ours == _generate_ids(gen, _prompts(gen), d) and ours != plain.new_ids(_prompts(plain), d)


def test_streaming_gives_the_generated_text(gen):
    d = DecodingArgs(max_new_tokens=20)
    prompt = _prompts(gen)[0]
    pieces = list(gen.stream_ids(prompt, d))
    assert len(pieces) > 1 and "".join(pieces) == gen.generate_ids([prompt], d)[0]


def test_sampling_stops_at_the_budget_and_follows_the_seed(gen):
    d = DecodingArgs(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(3)
    first = gen.new_ids(_prompts(gen), d)
    torch.manual_seed(3)
    assert gen.new_ids(_prompts(gen), d) == first
    assert all(len(row) <= 10 for row in first)
    assert first != gen.new_ids(_prompts(gen), DecodingArgs(max_new_tokens=10))


def test_eos_ends_a_row(gen):
    """A row whose greedy path meets an end token stops there while the others go on."""
    d = DecodingArgs(max_new_tokens=12)
    prompts = _prompts(gen)
    first = gen.new_ids(prompts[:1], d)[0]
    end = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    eos_ids = gen.eos_ids
    gen.eos_ids = [first[end]]
    try:
        rows = gen.new_ids(prompts, d)
        assert rows[0] == first[:end] and rows == _generate_ids(gen, prompts, d)
    finally:
        gen.eos_ids = eos_ids


def test_other_models_and_options_use_generate(gen, tmp_path, tokenizer, lively_glm_dir):
    from conftest import save_preset

    assert not gen._own_loop_for(DecodingArgs(num_beams=2)) and not gen._own_loop_for(DecodingArgs(no_repeat_ngram_size=2))
    assert Generator.load(save_preset("t5-tiny", tokenizer, tmp_path / "t5")).loop is None
    assert Generator.load(lively_glm_dir).loop is None
