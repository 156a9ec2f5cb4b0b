"""A step's loss is token-weighted over its micro-batches and ranks: --grad-accum 4 --batch-size 2
trains exactly as --batch-size 8, and 2 processes as 1, on batches of different lengths."""

import json

import pytest
import torch
from conftest import write_conversations
from safetensors.torch import load_file
from test_distributed import torchrun

from huayu.cli import main

# dialogues of very different lengths, so that micro-batches predict different numbers of tokens
UNEVEN = [["你好", "你好。"], ["今天天气怎么样？", "今天天气很好，适合出去走走，我们一起去公园散步吧，好不好？"],
          ["谢谢", "不客气，很高兴能帮到你，祝你今天过得愉快，晚安，做个好梦。"], ["晚安", "晚安。"]] * 4


def sft(model_dir, data, out, *extra):
    return ["sft", "--model", model_dir, "--data", data, "--max-steps", "3", "--log-every", "1", "--lr", "1e-2",
            "--warmup-steps", "0", "--no-cache", "--out", str(out), *extra]


def losses(out) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


def weights(out) -> dict:
    return load_file(out / "model.safetensors")


def assert_same_training(a, b):
    """The same loss at every step (the later ones after updates from the earlier gradients), and
    the same weights up to float rounding, which Adam's normalised steps of lr 1e-2 magnify."""
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    wa, wb = weights(a), weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3


def test_accumulated_micro_batches_train_like_one_batch(tmp_path, lively_model_dir):
    data = write_conversations(tmp_path / "d.jsonl", UNEVEN)
    assert main(sft(lively_model_dir, data, tmp_path / "one", "--batch-size", "8")) == 0
    assert main(sft(lively_model_dir, data, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "4")) == 0
    assert_same_training(tmp_path / "one", tmp_path / "accum")


def test_the_mean_of_micro_batch_means_would_differ(tmp_path, tokenizer, lively_model_dir):
    """The test above can fail: on these batches the old per-micro-batch mean is another loss."""
    from huayu.data.chat import encode_dialogue
    from huayu.models.families import family_of
    from huayu.models.loading import load_model

    model = load_model(lively_model_dir, tokenizer)
    collate = family_of(model.config).collate(tokenizer.pad_token_id)
    examples = sorted((encode_dialogue(tokenizer, [{"role": ("user", "assistant")[i % 2], "content": t}
                                                   for i, t in enumerate(d)], 64, 64) for d in UNEVEN[:8]),
                      key=lambda e: len(e.input_ids))  # micro-batches of short, then of long dialogues
    with torch.no_grad():
        whole = model(**collate(examples)).loss.item()
        means = [model(**collate(examples[i:i + 2])).loss.item() for i in range(0, 8, 2)]
    items = [family_of(model.config).loss_items(collate(examples[i:i + 2])) for i in range(0, 8, 2)]
    assert abs(sum(means) / 4 - whole) > 1e-3
    assert sum(m * n for m, n in zip(means, items)) / sum(items) == pytest.approx(whole, abs=1e-5)


def test_two_processes_weight_their_tokens_like_one(tmp_path, lively_model_dir):
    data = write_conversations(tmp_path / "d.jsonl", UNEVEN)
    assert main(sft(lively_model_dir, data, tmp_path / "one", "--batch-size", "4")) == 0
    torchrun(tmp_path, sft(lively_model_dir, data, tmp_path / "ddp", "--batch-size", "2"), [tmp_path / "ddp"],
             tmp_path / "writes")
    assert_same_training(tmp_path / "one", tmp_path / "ddp")
