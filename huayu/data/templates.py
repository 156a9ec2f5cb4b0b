"""The chat template huayu's own tokenizers carry, and how any tokenizer renders a conversation.

A checkpoint's tokenizer owns its template (`tokenizer.chat_template`, saved in
tokenizer_config.json), so the template used at inference is the one the model was trained with.
Tokenizers without one (e.g. a base GPT-2 checkpoint) get DEFAULT_CHAT_TEMPLATE at SFT time and keep
it in the saved output.
"""

from __future__ import annotations

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, SEP = "<|system|>", "<|user|>", "<|assistant|>", "<sep>"
MASK = "[MASK]"  # what a masked-LM encoder learns to fill (BERT's and ERNIE's spelling)
# GLM's other tokens (huayu/models/glm.py), added to a tokenizer when a GLM is built with it
SMASK, GMASK, SOP, EOP = "[sMASK]", "[gMASK]", "<sop>", "<eop>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SYSTEM, USER, ASSISTANT, SEP, MASK]

# Every turn is "<|role|>content</s>"; generation stops at </s> (the tokenizer's eos token). Tools
# (docs/tools.md) are listed in the system turn as <tools>, one JSON schema a line, </tools>; a
# reply's calls follow its text as <tool_call>{"name": ..., "arguments": {...}}</tool_call>; a
# tool's result is a system turn <tool_response>...</tool_response>, which no user text can forge
# (<|system|> is a control token, user text is plain text). Without tools it renders as before.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>{{ eos_token }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% if not (tools and loop.first) %}<|system|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}<|system|><tool_response>{{ m['content'] }}</tool_response>{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")

# Written beside the weights of every chat-trained output (model or adapter), so that inference can
# tell whether the template it renders with is the one those weights learned.
TEMPLATE_RECORD = "huayu_chat_template.json"


def template_sha256(template: str) -> str:
    import hashlib

    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def write_template_record(directory, tokenizer) -> None:
    import json
    from pathlib import Path

    record = {"chat_template_sha256": template_sha256(tokenizer.chat_template),
              "note": "the chat template this model's weights were fine-tuned with"}
    Path(directory, TEMPLATE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def template_mismatch(tokenizer, weights_dir) -> str | None:
    """Why the tokenizer's template is not the one the weights in `weights_dir` were trained with,
    or None when it is (or when no record says otherwise)."""
    import json
    from pathlib import Path

    path = Path(weights_dir, TEMPLATE_RECORD)
    if not path.exists():
        return None
    trained = json.loads(path.read_text(encoding="utf-8")).get("chat_template_sha256")
    if not tokenizer.chat_template:
        return f"'{weights_dir}' was fine-tuned with a chat template, but the tokenizer loaded for it has none"
    if trained != template_sha256(tokenizer.chat_template) and trained not in _former_shas(tokenizer.chat_template):
        return (f"the tokenizer's chat template differs from the one '{weights_dir}' was fine-tuned with "
                f"(sha256 {trained[:12]}… recorded in {TEMPLATE_RECORD}): replies will be rendered in a format "
                "the model did not learn; use the tokenizer saved with the model")
    return None


def _former_shas(template: str) -> tuple[str, ...]:
    """The hashes of a registry template's earlier texts, which rendered every dialogue they could
    render as it does (it has since learned tools): weights trained with them fit it."""
    from huayu.data.chat_templates import _BY_TEXT

    entry = _BY_TEXT.get(template)
    return entry.former if entry else ()
