"""Packed SFT (`huayu sft --packing`) is exact: a packed batch gives the loss and gradients of the same
examples unpacked, no token of one sequence reaches another, and a model that would let them is
refused. Also: length-grouped batches, and truncation that keeps the prompt of an over-long reply."""

import json
import random

import pytest
import torch
from conftest import DIALOGUES, write_conversations

from huayu.cli import main
from huayu.data.batching import IGNORE, Example, PackedBatch, batch_counts, pad_collate, packed_collate
from huayu.data.packing import PackedExamples, best_fit_rows


def examples_of(n: int, seed: int = 0, vocab: int = 40, loss_everywhere: bool = False) -> list[Example]:
    """Dialogue-like examples of 3-30 tokens: a prompt without loss, then a reply with it (or loss on
    every token, whose first label only packing would ever predict)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 30))]
        prompt = rng.randint(1, len(ids) - 1)
        labels = list(ids) if loss_everywhere else [IGNORE] * prompt + ids[prompt:]
        out.append(Example(ids, labels))
    return out


@pytest.fixture(scope="module")
def model(lively_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lively_model_dir, dtype=torch.float32).train()


def loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad()
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_rows_hold_every_example_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 60) for _ in range(500)]
    rows = best_fit_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert rows == best_fit_rows(lengths, 64)  # the same rows every time: resume sees the same data
    assert sum(lengths) / (len(rows) * 64) > 0.95  # best-fit decreasing leaves little room


@pytest.mark.parametrize("loss_everywhere", [False, True])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_examples_unpacked(model, loss_everywhere):
    model.config.use_cache = True  # as a loaded checkpoint is: the packed batch must switch the cache off itself
    examples = examples_of(12, loss_everywhere=loss_everywhere)
    rows = PackedExamples(examples, 64)
    assert len(rows) < len(examples) and all(r.sequences >= 1 for r in rows)
    packed = packed_collate(0)([rows[i] for i in range(len(rows))])
    assert isinstance(packed, PackedBatch) and "attention_mask" not in packed
    assert batch_counts(packed) == (12, sum(len(e.input_ids) for e in examples))
    unpacked_loss, unpacked_grads = loss_and_grads(model, pad_collate(0)(examples))
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5)
    worst = max(float((packed_grads[n] - g).abs().max()) for n, g in unpacked_grads.items())
    assert worst < 1e-5, worst


def test_a_token_of_one_sequence_cannot_change_another(model):
    model.eval()
    a, b = examples_of(2, seed=3)
    rows = PackedExamples([a, b], 64)
    batch = packed_collate(0)([rows[0]])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, :len(a.input_ids)] = (changed["input_ids"][0, :len(a.input_ids)] + 7) % 40 + 4
    with torch.no_grad():
        before, after = model(**batch).logits[0], model(**changed).logits[0]
        cached = model(**dict(changed, use_cache=True)).logits[0]  # what a cache would let through
    model.train()
    second = slice(len(a.input_ids), len(a.input_ids) + len(b.input_ids))
    assert torch.equal(before[second], after[second])
    assert not torch.allclose(before[second], cached[second], atol=1e-3), "the test cannot see contamination"


def sft_args(model_dir, data, out, *extra):
    return ["sft", "--model", model_dir, "--data", data, "--max-steps", "3", "--batch-size", "2",
            "--max-seq-length", "48", "--log-every", "1", "--out", str(out), *extra]


def test_sft_packing_trains_and_says_how_full_its_rows_are(lively_model_dir, tmp_path, capsys):
    data = write_conversations(tmp_path / "d.jsonl", DIALOGUES * 4)
    assert main(sft_args(lively_model_dir, data, tmp_path / "packed", "--packing")) == 0
    out = capsys.readouterr().out
    assert "packing: 24 examples -> " in out and "% filled" in out
    result = json.loads((tmp_path / "packed" / "train_result.json").read_text())
    assert result["steps"] == 3 and result["train_loss"] > 0


def test_packing_is_refused_for_a_model_that_would_mix_the_sequences(tmp_path, tokenizer, capsys):
    """BLOOM takes its ALiBi positions from the attention mask, not the position ids."""
    from transformers import BloomConfig, BloomForCausalLM

    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(
        model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(sft_args(str(model_dir), data, tmp_path / "out", "--packing")) == 1
    assert "let packed sequences see each other" in capsys.readouterr().err


def test_packing_is_refused_for_an_encoder_decoder(tmp_path, tokenizer_dir, capsys):
    data = write_conversations(tmp_path / "d.jsonl")
    assert main(["sft", "--model", "t5-tiny", "--tokenizer", tokenizer_dir, "--data", data, "--packing",
                 "--out", str(tmp_path / "out")]) == 1
    assert "--packing packs decoder-only examples" in capsys.readouterr().err


def test_length_grouped_batches_pad_less_and_repeat_exactly():
    from huayu.train.loop import TrainArgs, _batches

    rng = random.Random(2)
    lengths = [rng.randint(1, 200) for _ in range(400)]
    args = TrainArgs(batch_size=8, seed=5, group_by_length=True)

    def epoch(start=0):
        batches = _batches(len(lengths), args, start, lengths)
        return [next(batches)[1] for _ in range(50 - start)]

    grouped = epoch()
    assert sorted(i for b in grouped for i in b) == list(range(400))  # every example once per epoch
    plain = [next(_batches(len(lengths), TrainArgs(batch_size=8, seed=5), k))[1] for k in range(50)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert epoch(start=20) == grouped[20:]  # a resumed run continues with the same batches


def test_an_over_long_reply_keeps_its_prompt(tokenizer):
    """A reply longer than --max-seq-length used to leave no prompt: the model learnt to answer nothing."""
    from huayu.data.chat import encode_dialogue

    messages = [{"role": "user", "content": "请写一首关于春天的诗。"}, {"role": "assistant", "content": "春" * 300}]
    example = encode_dialogue(tokenizer, messages, 256, 256, max_length=64)
    prompt = sum(label == IGNORE for label in example.labels)
    assert len(example.input_ids) == 64
    assert prompt >= len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
    assert example.full_length > 300


def test_packed_full_batch_training_is_unpacked_training(tmp_path, lively_model_dir, capsys):
    """Every step on the whole data set, packed or not: the same loss at every step (the later ones
    after updates from the earlier gradients) and the same weights; and with --grad-accum, packed
    micro-batches train as one packed batch (token-weighted)."""
    from test_token_weighting import UNEVEN, assert_same_training, sft

    data = write_conversations(tmp_path / "d.jsonl", UNEVEN)
    assert main(sft(lively_model_dir, data, tmp_path / "plain", "--batch-size", "16")) == 0
    assert main(sft(lively_model_dir, data, tmp_path / "packed", "--batch-size", "16", "--packing",
                    "--max-seq-length", "96")) == 0
    assert_same_training(tmp_path / "plain", tmp_path / "packed")
    assert "16 examples -> 5 rows" in capsys.readouterr().out  # so 5 micro-batches of one row are the data set
    assert main(sft(lively_model_dir, data, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "5",
                    "--packing", "--max-seq-length", "96")) == 0
    assert_same_training(tmp_path / "packed", tmp_path / "accum")
