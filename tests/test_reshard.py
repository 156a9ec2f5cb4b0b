"""huayu export reshard: the same weights in safetensors shards with an index, loaded by every stage."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_preset, write_conversations, write_texts
from safetensors.torch import load_file

from huayu.cli import main
from huayu.export import ReshardConfig, reshard
from huayu.generation import DecodingArgs, Generator


def weights(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read straight from its safetensors file(s)."""
    out = {}
    for path in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(path))
    return out


def test_shards_hold_the_same_weights_within_the_size_and_keep_the_dtype(tmp_path, tokenizer):
    from huayu.models.loading import load_model

    source = tmp_path / "bf16"
    load_model("tiny", tokenizer, seed=0).to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    largest = max(t.numel() * t.element_size() for t in weights(source).values())
    limit = 2 * largest
    out, shards = reshard(ReshardConfig(model=str(source), max_shard_size=f"{limit // 1000}KB",
                                        out=str(tmp_path / "sharded")))
    files = sorted(out.glob("model-*.safetensors"))
    assert shards == len(files) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert all(f.stat().st_size <= limit + 10_000 for f in files)   # + the safetensors header
    before, after = weights(source), weights(out)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)
    # and back into one file
    single, shards = reshard(ReshardConfig(model=str(out), max_shard_size="10GB", out=str(tmp_path / "single")))
    assert shards == 1 and (single / "model.safetensors").exists()
    assert all(torch.equal(weights(single)[k], before[k]) for k in before)


def test_one_shard_has_an_index_too_and_loads_with_plain_transformers_and_huayu(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from huayu.models.loading import load_model

    single, shards = reshard(ReshardConfig(model=tiny_model_dir, max_shard_size="10GB", out=str(tmp_path / "one")))
    index = json.loads((single / "model.safetensors.index.json").read_text())
    stored = weights(single)
    assert shards == 1 and index["weight_map"] == {name: "model.safetensors" for name in stored}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for loaded in (AutoModelForCausalLM.from_pretrained(single), load_model(str(single), tokenizer)):
        assert all(torch.equal(value, source[name]) for name, value in loaded.state_dict().items())
    # a directory holding the file and its index reshards like any other
    many, shards = reshard(ReshardConfig(model=str(single), max_shard_size="100KB", out=str(tmp_path / "many")))
    assert shards > 1 and set(json.loads((many / "model.safetensors.index.json").read_text())["weight_map"].values()) \
        == {f.name for f in many.glob("model-*.safetensors")}
    assert all(torch.equal(value, stored[name]) for name, value in weights(many).items())


def test_every_stage_loads_a_sharded_model(tmp_path, lively_model_dir, lively_glm_dir, tokenizer, tokenizer_dir):
    texts, dialogues = write_texts(tmp_path / "t.txt"), write_conversations(tmp_path / "d.jsonl")
    for name, source in (("decoder", lively_model_dir), ("glm", lively_glm_dir)):
        sharded = str(tmp_path / name)
        assert main(["export", "reshard", source, "--max-shard-size", "100KB", "--out", sharded]) == 0
        d = DecodingArgs(max_new_tokens=8)
        prompt = Generator.load(source).encode_text("你好")
        assert Generator.load(sharded).new_ids([prompt], d) == Generator.load(source).new_ids([prompt], d)
        common = ["--batch-size", "4", "--max-steps", "2"]
        assert main(["sft", "--model", sharded, "--data", dialogues, "--out", str(tmp_path / f"{name}-sft"),
                     *common]) == 0
        assert main(["eval", sharded, "--data", dialogues, "--max-new-tokens", "4",
                     "--out", str(tmp_path / f"{name}-eval")]) == 0
    assert main(["pretrain", "--model", str(tmp_path / "decoder"), "--data", texts, "--seq-len", "32",
                 "--out", str(tmp_path / "pt"), "--batch-size", "4", "--max-steps", "2"]) == 0
    encoder = save_preset("bert-tiny", tokenizer, tmp_path / "bert")
    assert main(["export", "reshard", encoder, "--max-shard-size", "100KB", "--out", str(tmp_path / "bert-sh")]) == 0
    (tmp_path / "c.tsv").write_text("text\tlabel\n好\t1\n差\t0\n" * 4, encoding="utf-8")
    labelled = str(tmp_path / "c.tsv")
    assert main(["finetune-cls", str(tmp_path / "bert-sh"), "--train", labelled, "--dev", labelled,
                 "--max-steps", "2", "--batch-size", "4", "--out", str(tmp_path / "cls")]) == 0


def test_reshard_refuses_adapters_occupied_outputs_and_bad_sizes(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", "reshard", tiny_model_dir, "--out", str(tmp_path / "full")]) != 0
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "reshard", tiny_model_dir, "--max-shard-size", "lots", "--out",
                 str(tmp_path / "o")]) != 0
    assert "--max-shard-size" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["export", "reshard", str(tmp_path), "--out", str(tmp_path / "p")]) != 0
    assert "not a model directory" in capsys.readouterr().err


@pytest.fixture
def lora_dir(tmp_path, tiny_model_dir):
    out = tmp_path / "lora"
    assert main(["sft", "--model", tiny_model_dir, "--data", write_conversations(tmp_path / "d.jsonl"),
                 "--finetuning-type", "lora", "--max-steps", "1", "--out", str(out)]) == 0
    return str(out)


def test_an_adapter_is_merged_first(tmp_path, lora_dir, capsys):
    assert main(["export", "reshard", lora_dir, "--out", str(tmp_path / "x")]) != 0
    assert "merge it into its base first" in capsys.readouterr().err
