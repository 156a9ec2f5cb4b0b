"""Rendering dialogues through the chat template and exactly which tokens carry loss."""

import pytest

from huayu.data.batching import IGNORE
from huayu.data.chat import encode_dialogue, encode_prompt
from huayu.errors import HuayuError

DIALOGUE = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"},
            {"role": "user", "content": "再见"}, {"role": "assistant", "content": "拜拜"}]


def learned(tokenizer, example) -> str:
    """The learned tokens as text, with '_' for each masked token."""
    return "".join(tokenizer.convert_ids_to_tokens(i) if l != IGNORE else "_"
                   for i, l in zip(example.input_ids, example.labels))


def test_render_matches_template(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE, 100, 100)
    assert tokenizer.decode(ex.input_ids) == "<|user|>你好</s><|assistant|>好的</s><|user|>再见</s><|assistant|>拜拜</s>"


def test_loss_on_assistant_turns_only(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE, 100, 100, loss_on="assistant")
    # <|user|> 你 好 </s> <|assistant|> are masked; the assistant's content and its </s> are learned
    assert learned(tokenizer, ex) == "_____好的</s>_____拜拜</s>"


def test_loss_on_last_turn(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE, 100, 100, loss_on="last")
    assert learned(tokenizer, ex) == "_" * 13 + "拜拜</s>"


def test_loss_on_all_tokens(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE, 100, 100, loss_on="all")
    assert ex.labels == ex.input_ids


def test_context_truncated_from_oldest_turn(tokenizer):
    # source budget 9 tokens: "<|user|>你好</s>" (4) and "<|assistant|>好的</s>" (4) are dropped first,
    # keeping "<|user|>再见</s>" (4) + "<|assistant|>" (1)
    ex = encode_dialogue(tokenizer, DIALOGUE, max_source_length=5, max_target_length=100)
    assert tokenizer.decode(ex.input_ids) == "<|user|>再见</s><|assistant|>拜拜</s>"
    ex = encode_dialogue(tokenizer, DIALOGUE, max_source_length=9, max_target_length=100)
    assert tokenizer.decode(ex.input_ids).startswith("<|assistant|>好的</s><|user|>再见")


def test_system_message_is_kept_when_truncating(tokenizer):
    dialogue = [{"role": "system", "content": "你好"}] + DIALOGUE
    ex = encode_dialogue(tokenizer, dialogue, max_source_length=9, max_target_length=100)
    assert tokenizer.decode(ex.input_ids) == "<|system|>你好</s><|user|>再见</s><|assistant|>拜拜</s>"


def test_long_single_turn_keeps_its_newest_tokens(tokenizer):
    dialogue = [{"role": "user", "content": "春天来了花都开了"}, {"role": "assistant", "content": "好的"}]
    ex = encode_dialogue(tokenizer, dialogue, max_source_length=4, max_target_length=1)
    assert tokenizer.decode(ex.input_ids) == "开了</s><|assistant|>好"


def test_trailing_user_turn_is_not_encoded(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE[:3], 100, 100)
    assert tokenizer.decode(ex.input_ids) == "<|user|>你好</s><|assistant|>好的</s>"


def test_dialogue_without_assistant_is_an_error(tokenizer):
    with pytest.raises(HuayuError, match="no assistant"):
        encode_dialogue(tokenizer, DIALOGUE[:1], 100, 100)


def test_prompt_ends_with_generation_header(tokenizer):
    ids = encode_prompt(tokenizer, DIALOGUE[:3], 100)
    assert tokenizer.decode(ids) == "<|user|>你好</s><|assistant|>好的</s><|user|>再见</s><|assistant|>"
    assert tokenizer.decode(encode_prompt(tokenizer, DIALOGUE[:3], 5)) == "<|user|>再见</s><|assistant|>"


def test_foreign_template_is_used_as_is(tokenizer):
    """A checkpoint's own (ChatML-style) template is respected, not replaced."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    ex = encode_dialogue(tok, DIALOGUE[:2], 100, 100)
    assert learned(tok, ex).endswith("好的</s>")
    # "[" and "]" are not in the fixture vocabulary: "[user]" is 6 <unk>, "[assistant]" 11
    assert tok.decode(ex.input_ids).replace("<unk>", "?") == "??????你好</s>???????????好的</s>"


def test_max_length_cuts_the_context_to_fit_beside_the_reply(tokenizer):
    ex = encode_dialogue(tokenizer, DIALOGUE, 100, 100, max_length=8)
    # the reply "拜拜</s>" is 3 tokens, leaving 5 for the context: "<|user|>再见</s>" + "<|assistant|>"
    assert tokenizer.decode(ex.input_ids) == "<|user|>再见</s><|assistant|>拜拜</s>"
    assert ex.full_length == 16 and len(ex.input_ids) == 8
