"""The chat template huayu's own tokenizers carry, and how any tokenizer renders a conversation.

A checkpoint's tokenizer owns its template (`tokenizer.chat_template`, saved in
tokenizer_config.json), so the template used at inference is the one the model was trained with.
Tokenizers without one (e.g. a base GPT-2 checkpoint) get DEFAULT_CHAT_TEMPLATE at SFT time and keep
it in the saved output.
"""

from __future__ import annotations

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, SEP = "<|system|>", "<|user|>", "<|assistant|>", "<sep>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SYSTEM, USER, ASSISTANT, SEP]

# Every turn is "<|role|>content</s>"; generation stops at </s> (the tokenizer's eos token).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>"
    "{% elif m['role'] == 'user' %}<|user|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ROLES = ("system", "user", "assistant")
