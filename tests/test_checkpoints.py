"""Any local Hugging Face model directory works in every stage in place of a preset.

Two tiny stand-ins for downloaded checkpoints: a GPT-2 with a BERT-style Chinese vocabulary and no
chat template (like uer/gpt2-chinese-*, from hub_checkpoints.py, which has one per model family),
and a Qwen2 whose tokenizer is huayu's own char-level one with a ChatML-style template: a directory
whose config says qwen2 must still load the tokenizer saved in it, not Qwen2's.
"""

import json

import pytest
from conftest import DIALOGUES, write_conversations, write_texts
from hub_checkpoints import SHAPES, assert_spells_the_corpus, save_checkpoint

from huayu.cli import main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen2_chatml(path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize("kind", ["gpt2-bert-vocab", "qwen2-chatml"])
def test_every_stage_accepts_a_local_checkpoint(kind, tmp_path, tokenizer, capsys):
    from huayu.models.loading import load_tokenizer

    base = tmp_path / "base"
    base.mkdir()
    save_checkpoint(SHAPES["gpt2-chinese"], base) if kind == "gpt2-bert-vocab" else qwen2_chatml(base, tokenizer)
    assert_spells_the_corpus(load_tokenizer(str(base)))
    texts, dialogues = write_texts(tmp_path / "t.txt"), write_conversations(tmp_path / "d.jsonl")
    common = ["--batch-size", "4", "--log-every", "1"]
    assert main(["pretrain", "--model", str(base), "--data", texts, "--seq-len", "32", "--max-steps", "3",
                 "--out", str(tmp_path / "pt"), *common]) == 0
    assert main(["sft", "--model", str(tmp_path / "pt"), "--data", dialogues, "--max-steps", "3",
                 "--out", str(tmp_path / "sft"), *common]) == 0
    assert main(["eval", str(tmp_path / "sft"), "--data", dialogues, "--out", str(tmp_path / "ev"),
                 "--max-new-tokens", "4"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["samples"] == len(DIALOGUES) and metrics["loss"] > 0
    saved = load_tokenizer(str(tmp_path / "sft"))
    assert_spells_the_corpus(saved)
    if kind == "qwen2-chatml":  # the checkpoint's own template is kept, not replaced
        assert saved.chat_template == CHATML
    else:  # no template of its own: huayu's default is added and saved with the model
        assert "<|assistant|>" in saved.chat_template
