"""huayu.data.span_corruption: T5 noise masks, corruption, exact lengths, packing into examples."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from huayu.config import ConfigError
from huayu.data.span_corruption import (compute_lengths, corrupt, random_spans_noise_mask, sentinel_ids,
                                        span_corruption_examples)
from huayu.data.templates import SPECIAL_TOKENS
from huayu.errors import HuayuError
from huayu.tokenizer import train_tokenizer

SENTINELS = [90, 91, 92, 93, 94, 95, 96, 97, 98, 99]
EOS = 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["你好，世界！今天天气很好。"], kind="char", vocab_size=200, sentinels=30)


def reconstruct(inputs, targets, sentinels) -> list[int]:
    """Put each span of `targets` back where its sentinel sits in `inputs` (both lose their eos)."""
    spans: dict[int, list[int]] = {}
    for token in map(int, targets[:-1]):
        if token in sentinels:
            current = spans[token] = []
        else:
            current.append(token)
    return [t for token in map(int, inputs[:-1]) for t in spans.get(token, [token])]


def runs(mask) -> list[tuple[bool, int]]:
    """(value, length) of each run of equal values in `mask`."""
    edges = np.flatnonzero(np.diff(mask)) + 1
    return [(bool(r[0]), len(r)) for r in np.split(np.asarray(mask), edges)]


@pytest.mark.parametrize("length, noise, spans", [(2, 1, 1), (10, 2, 1), (100, 15, 5), (568, 85, 28)])
def test_mask_has_exact_counts_and_alternates_from_kept(length, noise, spans):
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = random_spans_noise_mask(length, rng=rng)
        assert mask.shape == (length,) and mask.sum() == noise
        assert [value for value, _ in runs(mask)] == [False, True] * spans


def test_mask_statistics_match_density_and_mean_span():
    rng = np.random.default_rng(1)
    masks = [random_spans_noise_mask(int(n), rng=rng) for n in rng.integers(50, 600, 2000)]
    noise_runs = [n for mask in masks for value, n in runs(mask) if value]
    flat = np.concatenate(masks)
    assert flat.mean() == pytest.approx(0.15, abs=0.002)
    assert np.mean(noise_runs) == pytest.approx(3.0, abs=0.05)
    assert min(noise_runs) == 1 and max(noise_runs) >= 10  # random lengths, not all equal to 3
    middle = np.stack([mask[10:50] for mask in masks]).mean(axis=0)  # away from the non-noise start
    assert middle.min() > 0.08 and middle.max() < 0.22


def test_mask_is_reproducible_from_the_seed():
    first = random_spans_noise_mask(200, rng=np.random.default_rng(7))
    assert np.array_equal(first, random_spans_noise_mask(200, rng=np.random.default_rng(7)))
    assert not np.array_equal(first, random_spans_noise_mask(200, rng=np.random.default_rng(8)))


def test_corrupt_replaces_each_span_by_one_sentinel():
    a, b, c, d, e, f, g = range(10, 17)
    inputs, targets = corrupt([a, b, c, d, e, f, g], [0, 1, 1, 0, 0, 1, 0], SENTINELS, EOS)
    assert inputs.tolist() == [a, 90, d, e, 91, g, EOS]
    assert targets.tolist() == [90, b, c, 91, f, EOS]


def test_sentinels_appear_in_order_once_per_span_and_reconstruct_exactly():
    rng = np.random.default_rng(2)
    for _ in range(200):
        ids = rng.integers(100, 200, int(rng.integers(2, 60)))
        mask = random_spans_noise_mask(len(ids), rng=rng, noise_density=0.3, mean_noise_span_length=2)
        spans = sum(value for value, _ in runs(mask))
        inputs, targets = corrupt(ids, mask, SENTINELS, EOS)
        assert [t for t in inputs if t in SENTINELS] == SENTINELS[:spans]
        assert [t for t in targets if t in SENTINELS] == SENTINELS[:spans]
        assert inputs[-1] == targets[-1] == EOS
        assert reconstruct(inputs, targets, SENTINELS) == ids.tolist()


def test_corrupt_needs_a_sentinel_per_span():
    with pytest.raises(HuayuError, match="3 noise spans but only 2 sentinels"):
        corrupt([5] * 6, [0, 1, 0, 1, 0, 1], [90, 91], EOS)


@pytest.mark.parametrize("density, mean", [(0.15, 3.0), (0.3, 2.0), (0.5, 3.0)])
@pytest.mark.parametrize("input_length", [3, 4, 10, 64, 128, 512, 1024])
def test_compute_lengths_gives_exact_input_length(input_length, density, mean):
    raw, target_length = compute_lengths(input_length, density, mean)
    rng = np.random.default_rng(3)
    ids = np.arange(100, 100 + raw + 1)
    inputs, targets = corrupt(ids[:raw], random_spans_noise_mask(raw, density, mean, rng=rng), range(90, 1000), EOS)
    assert (len(inputs), len(targets)) == (input_length, target_length)
    longer, _ = corrupt(ids, random_spans_noise_mask(raw + 1, density, mean, rng=rng), range(90, 1000), EOS)
    assert len(longer) > input_length  # the longest chunk that fits


def test_compute_lengths_matches_t5():
    assert compute_lengths(512) == (568, 114)


@pytest.mark.parametrize("call", [lambda: compute_lengths(2), lambda: compute_lengths(64, noise_density=1.0),
                                  lambda: compute_lengths(64, mean_noise_span_length=0.5)])
def test_bad_settings_are_config_errors(call):
    with pytest.raises(ConfigError):
        call()


def test_examples_pack_documents_into_exact_inputs(tok):
    docs = [list(range(1000, 1000 + n)) for n in (50, 300, 7, 120)]
    stream = [t for doc in docs for t in [*doc, tok.eos_token_id]]
    examples = span_corruption_examples(docs, tok, input_length=64, seed=0)
    raw, target_length = compute_lengths(64)
    *full, tail = examples
    assert len(examples) == -(-len(stream) // raw)
    assert all((len(e.input_ids), len(e.labels)) == (64, target_length) for e in full)
    assert len(tail.input_ids) < 64  # the short last chunk is kept, corrupted at its own length
    sentinels = sentinel_ids(tok, 30)
    assert [t for e in examples for t in reconstruct(e.input_ids, e.labels, sentinels)] == stream


def test_examples_drop_a_single_leftover_token_and_accept_a_flat_stream(tok):
    raw, _ = compute_lengths(64)
    examples = span_corruption_examples(np.arange(1000, 1000 + 2 * raw + 1), tok, input_length=64)
    assert [len(e.input_ids) for e in examples] == [64, 64]


def test_examples_are_reproducible_from_the_seed(tok):
    stream = list(range(1000, 1500))
    first, again, other = (span_corruption_examples(stream, tok, 64, seed=s) for s in (0, 0, 1))
    as_lists = lambda examples: [(e.input_ids.tolist(), e.labels.tolist()) for e in examples]  # noqa: E731
    assert as_lists(first) == as_lists(again) != as_lists(other)


def test_examples_handle_2m_tokens_quickly(tok):
    import time

    start = time.perf_counter()
    examples = span_corruption_examples(np.arange(2_000_000) % 5000 + 1000, tok, input_length=512)
    assert len(examples) == -(-2_000_000 // 568)
    assert time.perf_counter() - start < 10


def test_sentinel_ids_come_in_order_after_huayu_specials(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    first = len(SPECIAL_TOKENS)
    assert sentinel_ids(loaded, 30) == sentinel_ids(tok, 30) == list(range(first, first + 30))


@pytest.mark.parametrize("sentinels", [0, 5])
def test_missing_sentinels_are_a_clear_error(sentinels):
    plain = train_tokenizer(["你好"], kind="char", vocab_size=100, sentinels=sentinels)
    expected = rf"no <extra_id_{sentinels}>; train one with `huayu tokenizer train --sentinels 100`"
    with pytest.raises(HuayuError, match=expected):
        sentinel_ids(plain, 10)
    with pytest.raises(HuayuError, match="--sentinels"):
        span_corruption_examples(range(1000, 2000), plain, input_length=512)
