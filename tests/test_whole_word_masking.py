"""huayu.data.whole_word_masking: whole words masked together, the rate, 80/10/10, SOP, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_token_store import DOCUMENTS, index

from huayu.cli import main
from huayu.data.batching import IGNORE
from huayu.data.classification import boundary_ids
from huayu.data.whole_word_masking import WholeWordMasking, build_samples, mlm_loss, whole_word_mask


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir):
    return index(tmp_path_factory.mktemp("store"), tokenizer_dir, DOCUMENTS * 50)


def words_of(starts: np.ndarray) -> list[np.ndarray]:
    """The positions of each word, given 1 where a word starts."""
    return np.split(np.arange(len(starts)), np.flatnonzero(starts)[1:])


def test_a_word_is_masked_whole_or_not_at_all():
    rng = np.random.default_rng(0)
    for _ in range(500):
        starts = (rng.random(60) < 0.5).astype(np.int64)
        starts[0] = 1
        masked = set(whole_word_mask(starts, np.ones(60, dtype=bool), 0.15, rng).tolist())
        assert masked
        for word in words_of(starts):
            assert set(word.tolist()) <= masked or not set(word.tolist()) & masked


def test_the_masking_rate_stays_within_the_budget():
    rng = np.random.default_rng(1)
    shares = []
    for _ in range(2000):
        starts = (rng.random(120) < 0.6).astype(np.int64)
        starts[0] = 1
        candidate = np.ones(120, dtype=bool)
        candidate[[0, -1]] = False
        masked = whole_word_mask(starts, candidate, 0.15, rng)
        assert candidate[masked].all() and len(masked) <= round(118 * 0.15)
        shares.append(len(masked) / 118)
    assert np.mean(shares) == pytest.approx(0.15, abs=0.01)


def test_collated_samples_mask_whole_words_at_15_percent_with_80_10_10(store, tokenizer):
    masking = WholeWordMasking(store, tokenizer, seq_len=64)
    samples = build_samples(store, np.arange(store.n_documents), 64, 0.0, False, seed=0)
    rng = np.random.default_rng(0)
    examples = [masking.example(s, rng) for s in samples for _ in range(20)]
    predicted = kept = masked = candidates = 0
    for e, sample in zip(examples, np.repeat(samples, 20, axis=0)):
        start, _, end = sample
        labelled = e["labels"] != IGNORE
        assert (e["original"][0], e["original"][-1]) == boundary_ids(tokenizer)  # huayu's: <s> ... </s>
        assert not labelled[[0, -1]].any()  # [CLS] and [SEP] are never predicted
        assert (e["labels"][labelled] == e["original"][labelled]).all()
        for word in words_of(np.concatenate([[1], store.words[start:end], [1]])):
            assert labelled[word].all() or not labelled[word].any()
        predicted += labelled.sum()
        candidates += len(e["input_ids"]) - 2
        masked += (e["input_ids"][labelled] == tokenizer.mask_token_id).sum()
        kept += (e["input_ids"][labelled] == e["original"][labelled]).sum()
    assert predicted / candidates == pytest.approx(0.15, abs=0.015)
    assert masked / predicted == pytest.approx(0.8, abs=0.02)
    assert kept / predicted == pytest.approx(0.1, abs=0.02)  # (+ the rare random token equal to the original)
    assert 1 - (masked + kept) / predicted == pytest.approx(0.1, abs=0.02)


def test_every_pass_masks_a_sample_anew(store, tokenizer):
    masking = WholeWordMasking(store, tokenizer, seq_len=64)
    samples = build_samples(store, np.arange(4), 64, 0.0, False, seed=0)
    torch.manual_seed(0)
    first, second = masking(samples), masking(samples)
    assert torch.equal(first["attention_mask"], second["attention_mask"])
    assert not torch.equal(first["labels"], second["labels"])
    torch.manual_seed(0)
    assert torch.equal(masking(samples)["labels"], first["labels"])  # from torch's (checkpointed) random state


def test_sop_pairs_are_consecutive_sentence_runs_swapped_half_the_time(store, tokenizer):
    masking = WholeWordMasking(store, tokenizer, seq_len=128, sop=True)
    samples = build_samples(store, np.arange(store.n_documents), 128, 0.0, True, seed=0)
    assert len(samples) and (samples[:, 0] < samples[:, 1]).all() and (samples[:, 1] < samples[:, 2]).all()
    sentence_starts = set(store.sentence_offsets.tolist())
    assert {int(b) for b in samples[:, 1]} <= sentence_starts  # B begins at a sentence
    rng = np.random.default_rng(3)
    labels = []
    for start, split, end in samples:
        e = masking.example((start, split, end), rng)
        seps = np.flatnonzero(e["original"] == boundary_ids(tokenizer)[1])
        assert len(seps) == 2 and seps[1] == len(e["original"]) - 1
        a, b = e["original"][1:seps[0]], e["original"][seps[0] + 1:-1]
        first, second = store.ids[start:split].tolist(), store.ids[split:end].tolist()
        assert (a.tolist(), b.tolist()) == ((second, first) if e["sop_label"] else (first, second))
        assert (e["token_type_ids"][:seps[0] + 1] == 0).all() and (e["token_type_ids"][seps[0] + 1:] == 1).all()
        labels.append(e["sop_label"])
    assert np.mean(labels) == pytest.approx(0.5, abs=0.1)


def test_long_samples_are_cut_to_seq_len_and_short_ones_drawn(store, tokenizer):
    samples = build_samples(store, np.arange(store.n_documents), 24, 0.5, True, seed=0)
    masking = WholeWordMasking(store, tokenizer, seq_len=24, sop=True)
    torch.manual_seed(0)
    batch = masking(samples)
    assert batch["input_ids"].shape[1] <= 24 and "next_sentence_label" in batch
    assert (batch["attention_mask"].sum(1) < 24).any()


def test_mlm_loss_on_the_masked_positions_equals_the_models_own_loss(store, tokenizer):
    from huayu.models.loading import load_model

    model = load_model("bert-tiny", tokenizer, seed=0).eval()
    masking = WholeWordMasking(store, tokenizer, seq_len=64, sop=True)
    torch.manual_seed(0)
    batch = masking(build_samples(store, np.arange(8), 64, 0.0, True, seed=0))
    loss, parts = mlm_loss(model, batch)
    assert set(parts) == {"lm_loss", "sop_loss"}
    assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)  # transformers: MLM + NSP loss
    assert parts["lm_loss"] + parts["sop_loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_pretrain_mlm_end_to_end_and_show_masked(tmp_path, store, tokenizer_dir, capsys):
    """`huayu pretrain --objective mlm --sop` on a token store: lm and sop losses logged, a plain
    transformers BertForPreTraining saved; `huayu data show-masked` prints masked samples."""
    import json

    from transformers import AutoModelForPreTraining

    out = tmp_path / "mlm"
    assert main(["pretrain", "--model", "bert-tiny", "--tokenizer", tokenizer_dir, "--objective", "mlm", "--sop",
                 "--data", store.prefix, "--split", "8,2", "--seq-len", "48", "--batch-size", "8", "--max-steps",
                 "30", "--log-every", "10", "--eval-every", "15", "--eval-samples", "16", "--lr", "2e-3",
                 "--bf16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lm_loss" in printed and "sop_loss" in printed and "seqs/s" in printed
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_lm_loss" in r]
    assert train[-1]["train_lm_loss"] < train[0]["train_lm_loss"]
    assert {"eval_loss", "eval_lm_loss", "eval_sop_loss"} <= set(next(r for r in rows if "eval_loss" in r))
    model = AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "BertForPreTraining"
    # continue-training: the saved encoder (its own tokenizer) is the next run's model
    assert main(["pretrain", "--model", str(out), "--objective", "mlm", "--sop", "--data", store.prefix, "--seq-len",
                 "48", "--batch-size", "8", "--max-steps", "3", "--log-every", "3", "--out", str(tmp_path / "more")]) == 0
    assert "BertForPreTraining from" in capsys.readouterr().out
    # and under a LoRA adapter, whose loss must reach the encoder through peft's wrapper
    assert main(["pretrain", "--model", str(out), "--objective", "mlm", "--sop", "--data", store.prefix, "--seq-len",
                 "48", "--batch-size", "8", "--max-steps", "2", "--log-every", "1", "--finetuning-type", "lora",
                 "--out", str(tmp_path / "lora")]) == 0
    assert "sop_loss" in capsys.readouterr().out and (tmp_path / "lora" / "adapter_model.safetensors").exists()

    assert main(["data", "show-masked", store.prefix, "--sop", "--seq-len", "32", "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "masked:" in shown and "original:" in shown and "labels:" in shown and "[MASK]" in shown


def test_mlm_needs_a_token_store(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "t.txt"
    data.write_text("你好。\n", encoding="utf-8")
    assert main(["pretrain", "--model", "bert-tiny", "--tokenizer", tokenizer_dir, "--objective", "mlm",
                 "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "huayu data index" in capsys.readouterr().err
