"""`--template` and `--system`: the field's chat templates, exactly which tokens of a 3-turn dialogue
carry loss under each, Qwen3's replies trained as they are prompted at inference, and the options
on sft, eval, chat, serve and huayu.load()."""

import json
import string

import pytest
from conftest import write_conversations

from huayu.data.batching import IGNORE
from huayu.data.chat import encode_dialogue, encode_prompt, training_dialogues
from huayu.data.chat_templates import TEMPLATES, reply_stop_id, use_template, with_system
from huayu.errors import HuayuError

DIALOGUE = [{"role": "system", "content": "系统"},
            {"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"},
            {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"},
            {"role": "user", "content": "问三"}, {"role": "assistant", "content": "答三"}]

# Each example as its tokens, the learned ones between « and »; a learned position whose label is
# not its input token shows as {label→input}. Written from the templates' definitions.
IM = "<|im_start|>"
EXPECTED = {
    "chatml": [f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n«答一<|im_end|>\n»"
               f"{IM}user\n问二<|im_end|>\n{IM}assistant\n«答二<|im_end|>\n»"
               f"{IM}user\n问三<|im_end|>\n{IM}assistant\n«答三<|im_end|>\n»"],
    "qwen2": [f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n«答一<|im_end|>\n»"
              f"{IM}user\n问二<|im_end|>\n{IM}assistant\n«答二<|im_end|>\n»"
              f"{IM}user\n问三<|im_end|>\n{IM}assistant\n«答三<|im_end|>\n»"],
    "qwen": [f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n«答一<|im_end|>\n»"
             f"{IM}user\n问二<|im_end|>\n{IM}assistant\n«答二<|im_end|>\n»"
             f"{IM}user\n问三<|im_end|>\n{IM}assistant\n«答三<|im_end|>\n»"],
    # not prefix-stable: the newest reply gets a (here empty) think block that earlier ones lose,
    # so each reply is an example of its own, prompted exactly as at inference
    "qwen3": [f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n"
              "«<think>\n\n</think>\n\n答一<|im_end|>\n»",
              f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n答一<|im_end|>\n"
              f"{IM}user\n问二<|im_end|>\n{IM}assistant\n«<think>\n\n</think>\n\n答二<|im_end|>\n»",
              f"{IM}system\n系统<|im_end|>\n{IM}user\n问一<|im_end|>\n{IM}assistant\n答一<|im_end|>\n"
              f"{IM}user\n问二<|im_end|>\n{IM}assistant\n答二<|im_end|>\n"
              f"{IM}user\n问三<|im_end|>\n{IM}assistant\n«<think>\n\n</think>\n\n答三<|im_end|>\n»"],
    # no end-of-turn: a reply ends where <|user|> begins, which is learned (and appended to the last)
    "glm4": ["[gMASK]<sop><|system|>\n系统<|user|>\n问一<|assistant|>«\n答一<|user|>»"
             "\n问二<|assistant|>«\n答二<|user|>»\n问三<|assistant|>«\n答三<|user|>»"],
    "chatglm3": ["[gMASK]sop<|system|>\n 系统<|user|>\n 问一<|assistant|>«\n 答一<|user|>»"
                 "\n 问二<|assistant|>«\n 答二<|user|>»\n 问三<|assistant|>«\n 答三<|user|>»"],
    "llama3": ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n系统<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n问一<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n«答一<|eot_id|>»"
               "<|start_header_id|>user<|end_header_id|>\n\n问二<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n«答二<|eot_id|>»"
               "<|start_header_id|>user<|end_header_id|>\n\n问三<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n«答三<|eot_id|>»"],
    # the eos a Baichuan2 reply ends with is never rendered: it is the label where the next turn begins
    "baichuan2": ["系统<reserved_106>问一<reserved_107>«答一{</s>→<reserved_106>}»问二<reserved_107>"
                  "«答二{</s>→<reserved_106>}»问三<reserved_107>«答三</s>»"],
    "huayu": ["<|system|>系统</s><|user|>问一</s><|assistant|>«答一</s>»"
              "<|user|>问二</s><|assistant|>«答二</s>»<|user|>问三</s><|assistant|>«答三</s>»"],
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A character tokenizer that spells ASCII (role names, newlines) and the test's Chinese."""
    from huayu.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("template-tok")
    texts = [string.printable, "系统问一二三答想好你是助手"]
    train_tokenizer(texts, kind="char", vocab_size=300).save_pretrained(path)
    return str(path)


def tokenizer_for(base_dir, name: str):
    """The base tokenizer with the special tokens template `name` writes, rendering with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": list(TEMPLATES[name].tokens)})
    if name == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    use_template(tok, name)
    return tok


def view(tok, example) -> str:
    out, learning = [], False
    for token, label in zip(example.input_ids, example.labels):
        if (label != IGNORE) != learning:
            out.append("«" if not learning else "»")
            learning = not learning
        text = tok.convert_ids_to_tokens(token)
        out.append(text if label in (IGNORE, token) else "{%s→%s}" % (tok.convert_ids_to_tokens(label), text))
    return "".join(out + (["»"] if learning else []))


def encoded(tok, messages, loss_on="assistant"):
    return [encode_dialogue(tok, m, 10 ** 6, 10 ** 6, loss) for m, loss in training_dialogues(tok, messages, loss_on)]


def test_every_template_is_tested():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_three_turn_loss_mask(base_dir, name):
    tok = tokenizer_for(base_dir, name)
    assert [view(tok, ex) for ex in encoded(tok, DIALOGUE)] == EXPECTED[name]


def test_loss_on_last_learns_only_the_final_reply_even_for_qwen3(base_dir):
    tok = tokenizer_for(base_dir, "qwen3")
    (example,) = encoded(tok, DIALOGUE, "last")
    assert view(tok, example) == EXPECTED["qwen3"][-1]


@pytest.mark.parametrize("name, system", [
    ("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    ("qwen2", "You are a helpful assistant.")])
def test_qwen_adds_its_default_system_prompt(base_dir, name, system):
    tok = tokenizer_for(base_dir, name)
    (example,) = encoded(tok, DIALOGUE[1:3])
    assert view(tok, example) == (f"{IM}system\n{system}<|im_end|>\n{IM}user\n问一<|im_end|>\n"
                                  f"{IM}assistant\n«答一<|im_end|>\n»")


@pytest.mark.parametrize("checkpoint, name", [("Qwen2-7B-Instruct", "qwen2"), ("Qwen3-8B", "qwen3"),
                                              ("glm-4-9b-chat", "glm4"), ("Llama-2-7b-chat-hf", None)])
def test_a_checkpoints_own_template_is_known_by_how_it_renders(base_dir, checkpoint, name):
    """The real templates (tests/hub_chat_templates/, tool branches and all) render tool-less dialogues
    exactly as their registry entries, which then also give their reply ends to a fine-tune."""
    from pathlib import Path

    from huayu.data.chat_templates import template_of

    tok = tokenizer_for(base_dir, name or "huayu")
    tok.chat_template = (Path(__file__).parent / "hub_chat_templates" / f"{checkpoint}.jinja").read_text(encoding="utf-8")
    assert (template_of(tok) and template_of(tok).name) == name
    reasoning = [*DIALOGUE[:2], {"role": "assistant", "content": "<think>\n想一\n</think>\n\n答一"}, *DIALOGUE[3:]]
    for messages in (DIALOGUE, DIALOGUE[1:6], reasoning) if name else ():
        for prompt in (False, True):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tok.apply_chat_template(messages, chat_template=TEMPLATES[name].text, tokenize=False,
                                        add_generation_prompt=prompt)


def test_qwen3_reply_with_reasoning_trains_each_turn_with_its_inference_prompt(base_dir):
    tok = tokenizer_for(base_dir, "qwen3")
    dialogue = [{"role": "user", "content": "问一"},
                {"role": "assistant", "content": "<think>\n想一\n</think>\n\n答一"},
                {"role": "user", "content": "问二"}, {"role": "assistant", "content": "<think>想二</think>答二"}]
    first, second = encoded(tok, dialogue)
    assert view(tok, first) == (f"{IM}user\n问一<|im_end|>\n"
                                f"{IM}assistant\n«<think>\n想一\n</think>\n\n答一<|im_end|>\n»")
    # at the second turn the first reply is context without its reasoning, as Qwen3 renders it
    assert view(tok, second) == (f"{IM}user\n问一<|im_end|>\n{IM}assistant\n答一<|im_end|>\n"
                                 f"{IM}user\n问二<|im_end|>\n"
                                 f"{IM}assistant\n«<think>\n想二\n</think>\n\n答二<|im_end|>\n»")
    for example, turn in ((first, 1), (second, 3)):
        prompt = example.input_ids[:example.labels.index(next(l for l in example.labels if l != IGNORE))]
        assert prompt == encode_prompt(tok, dialogue[:turn], 10 ** 6)  # exactly what the model is prompted with


def test_reasoning_text_cannot_forge_turns(base_dir):
    tok = tokenizer_for(base_dir, "qwen3")
    dialogue = [{"role": "user", "content": "问<|im_end|>"},
                {"role": "assistant", "content": "<think>想<|im_end|></think>答"}]
    (example,) = encoded(tok, dialogue)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids.count(end) == 2  # the user turn's and the reply's, from the template only


def test_reply_end_is_a_stop_token_of_generation(base_dir):
    from huayu.generation import Generator
    from huayu.models.loading import load_model

    tok = tokenizer_for(base_dir, "glm4")
    generator = Generator(load_model("tiny", tok, seed=0), tok)
    assert reply_stop_id(tok) == tok.convert_tokens_to_ids("<|user|>") and reply_stop_id(tok) in generator.eos_ids
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not a registry template
    assert reply_stop_id(tok) is None


def test_unknown_template_lists_the_names(tokenizer):
    with pytest.raises(HuayuError, match="--template qwen9: no such template; choose one of chatml, qwen2, qwen, "):
        use_template(tokenizer, "qwen9")


def test_missing_special_tokens_are_named_not_split_into_characters(tokenizer):
    import copy

    with pytest.raises(HuayuError, match=r"--template chatml: the tokenizer lacks <\|im_end\|>, <\|im_start\|>"):
        use_template(copy.deepcopy(tokenizer), "chatml")


def test_template_file(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}", encoding="utf-8")
    use_template(tok, str(path))
    assert tok.chat_template == path.read_text(encoding="utf-8")
    prompt = encode_prompt(tok, [{"role": "user", "content": "你好"}], 100)
    assert tok.decode(prompt) == "<|user|>你好</s><|assistant|>"
    with pytest.raises(HuayuError, match="absent.jinja: cannot read the chat template file"):
        use_template(tok, str(tmp_path / "absent.jinja"))
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}", encoding="utf-8")
    with pytest.raises(HuayuError, match="broken.jinja: not a usable chat template"):
        use_template(tok, str(tmp_path / "broken.jinja"))
    (tmp_path / "foreign.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}",
                                            encoding="utf-8")
    with pytest.raises(HuayuError, match=r"foreign.jinja: the tokenizer lacks <\|im_start\|>"):
        use_template(tok, str(tmp_path / "foreign.jinja"))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_template_lists_the_markers_it_writes(base_dir, name):
    from huayu.data.chat_templates import _MARKER

    tok = tokenizer_for(base_dir, name)
    rendered = tok.apply_chat_template(DIALOGUE, tokenize=False, add_generation_prompt=False)
    written = set(_MARKER.findall(rendered)) - {tok.bos_token, tok.eos_token}
    assert written <= set(TEMPLATES[name].tokens)


def test_with_system_adds_one_only_where_there_is_none():
    user = [{"role": "user", "content": "你好"}]
    assert with_system(user, "你是助手") == [{"role": "system", "content": "你是助手"}] + user
    assert with_system(DIALOGUE, "你是助手") == DIALOGUE and with_system(user, None) == user


def test_sft_saves_the_template_and_gives_dialogues_the_system_message(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoTokenizer

    from huayu.cli import main
    from huayu.data.templates import TEMPLATE_RECORD, template_sha256
    from huayu.generation import Generator
    from huayu.train.sft import SftConfig, dialogue_examples

    cfg = SftConfig(model=tiny_model_dir, system="你是助手")
    given = with_system(DIALOGUE[1:3], "你是助手")
    assert dialogue_examples(tokenizer, DIALOGUE[1:3], cfg) == [(given, "assistant")]
    template = tmp_path / "bracketed.jinja"
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>[{{ m['content'] }}]{{ eos_token }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}", encoding="utf-8")
    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir, "--data", write_conversations(tmp_path / "d.jsonl"),
                 "--template", str(template), "--system", "你是助手", "--max-steps", "1", "--batch-size", "2",
                 "--no-cache", "--out", str(out)]) == 0
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == template.read_text(encoding="utf-8")
    record = json.loads((out / TEMPLATE_RECORD).read_text())
    assert record["chat_template_sha256"] == template_sha256(saved.chat_template)
    assert Generator.load(str(out)).template_problem is None  # inference renders as training did


def test_serve_system_is_the_default_and_a_request_system_wins(tiny_model_dir):
    from huayu.generation import Generator
    from huayu.serve.protocol import ChatRequest
    from huayu.serve.server import ServeConfig, Service

    generator = Generator.load(tiny_model_dir, template="huayu")
    service = Service(generator, None, "tiny", ServeConfig(system="你是助手"))
    user = [{"role": "user", "content": "你好"}]
    own = [{"role": "system", "content": "你是谁"}] + user
    assert service.encode_chat(ChatRequest(model="tiny", messages=user)) == \
        generator.encode_chat(with_system(user, "你是助手"))
    assert service.encode_chat(ChatRequest(model="tiny", messages=own)) == generator.encode_chat(own)


def test_load_with_a_system_message(tiny_model_dir):
    import huayu

    model = huayu.load(tiny_model_dir, system="你是助手")
    assert model._prompt("你好", None, None)[0][0] == {"role": "system", "content": "你是助手"}
    assert model._prompt("你好", None, "你是谁")[0][0]["content"] == "你是谁"


def test_eval_gives_test_dialogues_the_system_message(tmp_path):
    from huayu.evaluation.evaluate import EvalConfig, _read_dialogues

    cfg = EvalConfig(model="m", data=[write_conversations(tmp_path / "d.jsonl")], system="你是助手")
    assert all(d.messages[0] == {"role": "system", "content": "你是助手"} for d in _read_dialogues(cfg))


@pytest.mark.parametrize("command", ["sft", "eval", "chat", "serve"])
def test_template_and_system_options(command):
    from huayu.cli import build_parser

    args = build_parser(command).parse_args(["--template", "qwen3", "--system", "你是一名心理咨询师"])
    assert (args.template, args.system) == ("qwen3", "你是一名心理咨询师")
