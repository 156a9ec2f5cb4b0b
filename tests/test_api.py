"""The Python API (`huayu.load`): chat, streaming chat, batched generation, the chat-template check,
and `huayu serve --adapter` through the same loading path (quantizing on loading: test_quantization)."""

import json
import shutil
import time
import warnings

import pytest
from conftest import write_conversations

import huayu
from huayu.cli import main
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs, Generator, TemplateWarning

GREEDY = dict(do_sample=False, max_new_tokens=6, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def model(lively_model_dir):
    return huayu.load(lively_model_dir)


def test_chat_stream_chat_and_generate(model, lively_model_dir):
    response, history = model.chat("你好", **GREEDY)
    gen = Generator.load(lively_model_dir)
    expected = gen.generate_ids([gen.encode_chat([{"role": "user", "content": "你好"}], 512)],
                                DecodingArgs(max_new_tokens=6))[0].strip()
    assert response == expected and response
    assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": response}]
    streamed = list(model.stream_chat("你好", **GREEDY))
    assert streamed[-1] == (response, history)
    assert len(streamed) > 2
    assert all(streamed[i + 1][0].startswith(streamed[i][0].strip()) for i in range(len(streamed) - 2))
    second, longer = model.chat("你是谁？", history, **GREEDY)
    assert longer[:2] == history and len(history) == 2 and longer[-1] == {"role": "assistant", "content": second}
    batch = model.generate(["春天来了，", "我们一起"], max_new_tokens=5)
    assert batch == [model.generate(p, max_new_tokens=5)[0] for p in ["春天来了，", "我们一起"]]


def test_chatglm_pairs_and_system_messages(model):
    as_pairs = model.chat("你会做什么？", [("你好", "你好，很高兴认识你。")], **GREEDY)
    as_messages = model.chat("你会做什么？", [{"role": "user", "content": "你好"},
                                            {"role": "assistant", "content": "你好，很高兴认识你。"}], **GREEDY)
    assert as_pairs == as_messages
    _, history = model.chat("你好", system="你是一个助手", **GREEDY)
    assert history[0] == {"role": "system", "content": "你是一个助手"}


@pytest.mark.parametrize("call,message", [
    (lambda m: m.chat("你好", temprature=0.5), "unknown decoding option(s) temprature"),
    (lambda m: m.chat("你好", history=["bad"]), "history[0]: expected a message dict"),
    (lambda m: m.chat("你好", history=[{"role": "robot", "content": "x"}]), "history[0]: a message needs a role"),
    (lambda m: m.chat("你好", top_p=2.0), "--top-p must be in (0, 1]"),
])
def test_bad_calls_are_clear_errors(model, call, message):
    with pytest.raises(HuayuError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(model)


def test_sft_records_its_template_and_a_changed_one_is_reported(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir, "--data", data, "--max-steps", "2", "--batch-size", "2",
                 "--out", str(out)]) == 0
    record = json.loads((out / "huayu_chat_template.json").read_text())
    assert len(record["chat_template_sha256"]) == 64
    assert (out / "checkpoints/step-2/huayu_chat_template.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TemplateWarning)
        huayu.load(str(out)).chat("你好", max_new_tokens=2)  # the template it was trained with: no warning
    changed = tmp_path / "changed"
    shutil.copytree(out, changed, ignore=shutil.ignore_patterns("checkpoints"))
    jinja = changed / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("<|assistant|>", "<|user|>"))
    m = huayu.load(str(changed))
    assert "differs from the one" in m.template_problem
    with pytest.warns(TemplateWarning, match="differs from the one"):
        m.chat("你好", max_new_tokens=2)


def test_a_model_without_template_says_it_was_not_tuned_for_chat(lively_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(lively_model_dir).save_pretrained(tmp_path)
    m = huayu.load(str(tmp_path))
    assert "has no chat template" in m.template_problem
    with pytest.warns(TemplateWarning, match="not fine-tuned for chat"):
        assert m.chat("你好", **GREEDY)[0] == huayu.load(lively_model_dir).chat("你好", **GREEDY)[0]


def test_serve_with_an_adapter(lively_model_dir, tmp_path):
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    from huayu.serve.server import ServeConfig, build_service, create_app

    service = build_service(ServeConfig(model=lively_model_dir, adapter=str(tmp_path / "lora")))
    assert service.name == "lora"
    body = {"model": "lora", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0}
    with TestClient(create_app(service)) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        assert "choices" in answer, answer
        served = answer["choices"][0]["message"]["content"]
    with_adapter = Generator.load(lively_model_dir, adapter=str(tmp_path / "lora"))
    prompt = with_adapter.encode_chat(body["messages"])
    assert served == with_adapter.generate_ids([prompt], DecodingArgs(max_new_tokens=6))[0]
    plain = Generator.load(lively_model_dir)
    assert served != plain.generate_ids([prompt], DecodingArgs(max_new_tokens=6))[0]  # the adapter acts


def test_closing_a_stream_early_stops_the_generation(lively_model_dir):
    m = huayu.load(lively_model_dir)
    m.generator.eos_ids = []  # nothing ends it but max_new_tokens or the close
    steps = []
    forward = m.model.forward
    m.model.forward = lambda *a, **k: steps.append(1) or forward(*a, **k)
    stream = m.stream_chat("你好", do_sample=False, max_new_tokens=900, repetition_penalty=1.0)
    next(stream)
    stream.close()
    stopped_at = len(steps)
    time.sleep(0.5)
    assert len(steps) == stopped_at < 100, (stopped_at, len(steps))


def test_serving_a_prefix_adapter_is_a_clear_error(lively_model_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from huayu.serve.server import ServeConfig, build_service

    base = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path)
    with pytest.raises(HuayuError, match="prefix .P-Tuning v2. adapter"):
        build_service(ServeConfig(model=lively_model_dir, adapter=str(tmp_path)))
