"""The encoder-decoder family (T5 / EVA shaped): presets, example construction, sft, chat, eval and
LoRA, through the same commands and loading path as decoder-only models."""

import json

import pytest
import torch
from conftest import DIALOGUES, save_preset, write_conversations
from test_chat_cli import chat

from huayu.cli import main
from huayu.data.batching import IGNORE, seq2seq_collate
from huayu.data.chat import encode_source, encode_source_target
from huayu.generation import DecodingArgs, Generator
from huayu.models.families import ENCODER_DECODER, family_of_model
from huayu.models.loading import count_parameters, load_model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer):
    return save_preset("t5-tiny", tokenizer, tmp_path_factory.mktemp("t5"))


def test_presets_are_plain_transformers_t5_models(t5_dir, tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    assert model.config.model_type == "t5" and model.config.decoder_start_token_id == tokenizer.pad_token_id
    assert family_of_model(t5_dir) is ENCODER_DECODER and family_of_model("eva-cpu") is ENCODER_DECODER
    small = load_model("t5-small", tokenizer)
    assert 7e6 < count_parameters(small)[1] < 10e6  # ~9M with a 6k vocabulary; this test vocabulary is ~400
    eva = ENCODER_DECODER.build_config("eva1.0", 30000, {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})
    assert (eva.num_layers, eva.num_decoder_layers, eva.d_model, eva.num_heads) == (24, 24, 2048, 32)


def test_source_is_the_context_joined_by_sep_and_cut_from_the_oldest_turn(tokenizer):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，很高兴认识你。"},
                {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是一个小小的聊天模型。"}]
    ex = encode_source_target(tokenizer, messages, max_source_length=64, max_target_length=64)
    assert tokenizer.decode(ex.input_ids) == "你好<sep>你好，很高兴认识你。<sep>你是谁？"
    assert ex.labels == tokenizer("我是一个小小的聊天模型。", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cut = encode_source_target(tokenizer, messages, max_source_length=8, max_target_length=4)
    assert tokenizer.decode(cut.input_ids) == "你是谁？"  # the two oldest turns dropped whole
    assert len(cut.labels) == 4 and cut.labels[-1] == tokenizer.eos_token_id  # the reply cut, eos kept
    assert cut.full_length == len(ex.input_ids) + len(ex.labels)
    system = [{"role": "system", "content": "晚安"}] + messages[:3]
    assert tokenizer.decode(encode_source(tokenizer, system, 7)) == "晚安<sep>你是谁？"  # system kept


def test_collate_pads_encoder_and_decoder_separately(tokenizer):
    batch = seq2seq_collate(0)([type("E", (), {"input_ids": [5, 6, 7], "labels": [8, 3]})(),
                                type("E", (), {"input_ids": [5], "labels": [9, 9, 3]})()])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 3, IGNORE], [9, 9, 3]]


def test_sft_chat_and_eval_on_an_encoder_decoder(t5_dir, tmp_path):
    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "sft"
    assert main(["sft", "--model", t5_dir, "--data", data, "--max-steps", "40", "--batch-size", "3", "--lr", "3e-3",
                 "--schedule", "constant", "--out", str(out)]) == 0
    result = json.loads((out / "train_result.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert result["train_loss"] < 0.5 * log[0]["train_loss"]
    gen = Generator.load(str(out))
    prompts = [gen.encode_chat([{"role": "user", "content": d[0]}]) for d in DIALOGUES[:3]]
    greedy = DecodingArgs(max_new_tokens=12)
    assert gen.generate_ids(prompts, greedy) == [gen.generate_ids([p], greedy)[0] for p in prompts]
    assert gen.generate_ids([gen.encode_chat([{"role": "user", "content": "你好"}])], greedy)[0] == "你好，很高兴认识你。"
    assert main(["eval", str(out), "--data", data, "--out", str(tmp_path / "eval"), "--max-new-tokens", "12"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["samples"] == len(DIALOGUES) and metrics["loss"] < 2 and metrics["bleu4"] > 0
    lines = chat(str(out), "你好\nclear\nseed 3\n你好\n", "--beam")  # piped: one reply per line
    assert len(lines) == 2 and lines[0] == lines[1] == "你好，很高兴"  # 6 new tokens


def test_lora_on_an_encoder_decoder_trains_only_the_adapter(t5_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "lora"
    assert main(["sft", "--model", t5_dir, "--data", data, "--finetuning-type", "lora", "--max-steps", "4",
                 "--batch-size", "2", "--lr", "1e-2", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    adapted = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), str(out))
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    changed = {n for n, p in adapted.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert changed and all(".q." in n or ".v." in n for n in changed)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids, labels=ids).logits, base(input_ids=ids, labels=ids).logits)
    reply = Generator.load(t5_dir, adapter=str(out)).generate_ids([[5, 6, 7]], DecodingArgs(max_new_tokens=4))
    assert len(reply) == 1


def test_span_corruption_pretraining_lowers_the_loss(tmp_path, capsys):
    from conftest import TEXTS, write_texts

    from huayu.tokenizer import train_tokenizer

    train_tokenizer(TEXTS, kind="char", vocab_size=200, sentinels=20).save_pretrained(tmp_path / "tok")
    corpus = write_texts(tmp_path / "t.txt")
    out = tmp_path / "pt"
    assert main(["pretrain", "--model", "t5-tiny", "--tokenizer", str(tmp_path / "tok"), "--data", corpus,
                 "--seq-len", "24", "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--log-every", "5",
                 "--out", str(out)]) == 0
    assert "span-corrupted inputs of 24 tokens" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "train_loss" in line]
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    assert main(["pretrain", "--model", "t5-tiny", "--tokenizer", str(tmp_path / "tok"), "--data", corpus,
                 "--objective", "causal", "--out", str(tmp_path / "x")]) == 1
    assert "--objective causal does not fit 't5-tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["mt5", "bart"])
def test_other_encoder_decoder_checkpoints_work_in_place(arch, tokenizer, tmp_path):
    """A downloaded mT5 or BART directory takes the same path (here: tiny random ones, saved)."""
    from transformers import BartConfig, BartForConditionalGeneration, MT5Config, MT5ForConditionalGeneration

    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
    if arch == "mt5":
        model = MT5ForConditionalGeneration(MT5Config(vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16,
                                                      num_layers=2, num_heads=4, decoder_start_token_id=0, **special))
    else:
        model = BartForConditionalGeneration(BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2,
                                                        decoder_layers=2, encoder_attention_heads=4,
                                                        decoder_attention_heads=4, encoder_ffn_dim=128,
                                                        decoder_ffn_dim=128, decoder_start_token_id=special["eos_token_id"],
                                                        **special))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = write_conversations(tmp_path / "d.jsonl")
    for method in ("full", "lora"):
        out = tmp_path / method
        assert main(["sft", "--model", str(tmp_path / "base"), "--data", data, "--finetuning-type", method,
                     "--max-steps", "3", "--batch-size", "2", "--out", str(out)]) == 0
        gen = Generator.load(str(out)) if method == "full" else Generator.load(str(tmp_path / "base"), adapter=str(out))
        assert len(gen.generate_ids([gen.encode_chat([{"role": "user", "content": "你好"}])],
                                    DecodingArgs(max_new_tokens=4))) == 1


def test_freeze_and_all_linear_lora_on_an_encoder_decoder(t5_dir, tokenizer):
    from huayu.models.families import all_linear_targets, transformer_layers
    from huayu.train.methods import FinetuningArgs, apply_finetuning

    model = load_model(t5_dir, tokenizer)
    assert transformer_layers(model)[0] == "decoder.block"  # freeze trains the layers nearest the output
    pattern = all_linear_targets(model)
    assert "encoder\\.block" in pattern and "decoder\\.block" in pattern
    frozen = apply_finetuning(model, FinetuningArgs(finetuning_type="freeze", freeze_trainable_layers=1))
    trained = {n.split(".")[:3][-1] for n, p in frozen.named_parameters() if p.requires_grad}
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} and trained == {"1"}
    assert all(n.startswith("decoder.block.1.") for n, p in frozen.named_parameters() if p.requires_grad)


def test_prefix_tuning_on_an_encoder_decoder(t5_dir, tmp_path):
    data = write_conversations(tmp_path / "d.jsonl")
    out = tmp_path / "prefix"
    assert main(["sft", "--model", t5_dir, "--data", data, "--finetuning-type", "prefix", "--pre-seq-len", "4",
                 "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "SEQ_2_SEQ_LM"
    gen = Generator.load(str(out))  # the adapter names its base
    assert len(gen.generate_ids([gen.encode_chat([{"role": "user", "content": "你好"}])], DecodingArgs(max_new_tokens=4))) == 1
