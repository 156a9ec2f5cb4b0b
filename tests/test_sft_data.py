"""SFT data: the tokenized-dataset cache, length limits with their reports, and replay mixing."""

import argparse
import json
from collections import Counter
from dataclasses import replace

import pytest
from conftest import DIALOGUES, TEXTS, write_conversations, write_texts

from huayu.cli import main
from huayu.config import config_from_args
from huayu.data.cache import DataCacheConfig
from huayu.data.chat import encode_dialogue
from huayu.data.sources import holds_dialogues
from huayu.errors import DataError
from huayu.train import sft
from huayu.train.pretrain import block_dataset
from huayu.train.sft import SftConfig, build_examples, replay_indices


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    """Whatever a test does, the default cache is under tmp_path, never the user's home."""
    monkeypatch.setenv("HUAYU_CACHE", str(tmp_path / "default-cache"))


def config(tmp_path, data, **kw) -> SftConfig:
    return SftConfig(data=[data], cache_dir=str(tmp_path / "cache"), **kw)


def as_lists(examples) -> list:
    return [([int(t) for t in e.input_ids], [int(t) for t in e.labels]) for e in examples]


def entries(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def full_lengths(tokenizer, dialogues=DIALOGUES) -> list[int]:
    roles = ("user", "assistant")
    return [encode_dialogue(tokenizer, [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
                            1, 1).full_length for turns in dialogues]


@pytest.fixture
def counted_calls(tokenizer, monkeypatch):
    """How often any tokenizer of the fixture's class has tokenized text."""
    calls = Counter()
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls["tokenize"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    return calls


def test_second_build_is_a_cache_hit_equal_to_an_uncached_build(tmp_path, tokenizer, tokenizer_dir, counted_calls,
                                                                capsys):
    from transformers import AutoTokenizer

    cfg = config(tmp_path, write_conversations(tmp_path / "d.jsonl"))
    first, _ = build_examples(cfg, tokenizer)
    assert "tokenizing sft data" in capsys.readouterr().out and counted_calls["tokenize"] > 0
    counted_calls.clear()
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)  # a copy, as a resumed run loads it from a checkpoint
    second, _ = build_examples(cfg, reloaded)
    assert "cache hit: sft data" in capsys.readouterr().out
    assert counted_calls["tokenize"] == 0
    uncached, _ = build_examples(replace(cfg, cache=False), tokenizer)
    assert len(entries(tmp_path)) == 1
    assert as_lists(first) == as_lists(second) == as_lists(uncached)
    assert len(first) == len(DIALOGUES)


def test_a_failed_build_leaves_no_entry(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n', encoding="utf-8")
    with pytest.raises(DataError):
        build_examples(config(tmp_path, str(bad)), tokenizer)
    assert entries(tmp_path) == []


def _other_tokenizer(cfg, tokenizer, path):
    from huayu.tokenizer import train_tokenizer

    return cfg, train_tokenizer(TEXTS, kind="char", vocab_size=100)


def _edited_data(cfg, tokenizer, path):
    """Same size, other bytes: small files are keyed by their content, not by size and mtime."""
    size = path.stat().st_size
    write_conversations(path, DIALOGUES[:-1] + [["早安", "早安，做个好梦。"]])
    assert path.stat().st_size == size
    return cfg, tokenizer


def _lengths(**kw):
    return lambda cfg, tokenizer, path: (replace(cfg, dialogue=replace(cfg.dialogue, **kw)), tokenizer)


CHANGES = {
    "max_source_length": _lengths(max_source_length=8),
    "max_target_length": _lengths(max_target_length=8),
    "max_seq_length": lambda cfg, tokenizer, path: (replace(cfg, max_seq_length=20), tokenizer),
    "tokenizer": _other_tokenizer,
    "data": _edited_data,
}


@pytest.mark.parametrize("change", CHANGES)
def test_the_cache_is_invalidated_by(change, tmp_path, tokenizer, capsys):
    path = tmp_path / "d.jsonl"
    cfg = config(tmp_path, write_conversations(path))
    before, _ = build_examples(cfg, tokenizer)
    cfg, tok = CHANGES[change](cfg, tokenizer, path)
    capsys.readouterr()
    after, _ = build_examples(cfg, tok)
    assert "tokenizing sft data" in capsys.readouterr().out
    assert len(entries(tmp_path)) == 2
    assert as_lists(after) != as_lists(before)


def test_overlength_dialogues_are_truncated_and_counted(tmp_path, tokenizer, capsys):
    limit = 25
    full = full_lengths(tokenizer)
    over = sum(n > limit for n in full)
    assert 0 < over < len(full)
    examples, _ = build_examples(config(tmp_path, write_conversations(tmp_path / "d.jsonl"), max_seq_length=limit),
                                 tokenizer)
    out = capsys.readouterr().out
    assert f"6 dialogues -> 6 examples; {over} truncated to max source/target/total length 256/256/{limit}" in out
    lengths = [len(e.input_ids) for e in examples]
    assert all(n <= limit for n in lengths)  # whole oldest turns go first: often shorter than the limit
    assert [n == m for n, m in zip(lengths, full)] == [m <= limit for m in full]
    reply = tokenizer("不客气。", add_special_tokens=False)["input_ids"]
    assert as_lists(examples)[3][0][-len(reply) - 1:-1] == reply  # the context was cut, never the reply


def test_skip_overlength_drops_and_counts(tmp_path, tokenizer, capsys):
    limit = 25
    full = full_lengths(tokenizer)
    kept = [n for n in full if n <= limit]
    cfg = config(tmp_path, write_conversations(tmp_path / "d.jsonl"), max_seq_length=limit, skip_overlength=True)
    examples, _ = build_examples(cfg, tokenizer)
    out = capsys.readouterr().out
    assert f"6 dialogues -> {len(kept)} examples; 0 truncated" in out
    assert f"{len(full) - len(kept)} longer than {limit} tokens dropped (--skip-overlength)" in out
    assert [len(e.input_ids) for e in examples] == kept
    build_examples(cfg, tokenizer)
    assert f"{len(full) - len(kept)} longer than {limit} tokens dropped" in capsys.readouterr().out  # on a hit too


def test_replay_indices_sample_with_the_seed_and_cycle_a_small_pool():
    picked = replay_indices(100, 20, seed=1)
    assert len(set(picked)) == 20 and picked == replay_indices(100, 20, seed=1) != replay_indices(100, 20, seed=2)
    cycled = Counter(replay_indices(3, 7, seed=1))
    assert sum(cycled.values()) == 7 and set(cycled.values()) == {2, 3}


def test_replay_mixes_text_blocks_and_dialogues_by_ratio(tmp_path, tokenizer, capsys):
    domain = write_conversations(tmp_path / "d.jsonl")
    general = write_conversations(tmp_path / "general.jsonl", DIALOGUES[:2])
    corpus = write_texts(tmp_path / "corpus.txt")
    cfg = config(tmp_path, domain, replay_data=[corpus, general], replay_ratio=0.5, max_seq_length=32)
    train, _ = build_examples(cfg, tokenizer)
    out = capsys.readouterr().out
    assert len(train) == 6 + 3
    assert "replay: 6 training examples + 3 replay examples (ratio 0.5)" in out
    assert "blocks of 32 tokens" in out
    assert as_lists(build_examples(cfg, tokenizer)[0]) == as_lists(train)  # deterministic (and cached)
    reseeded = replace(cfg, train=replace(cfg.train, seed=7))
    assert as_lists(build_examples(reseeded, tokenizer)[0]) != as_lists(train)

    small = replace(cfg, replay_data=[general], replay_ratio=2.0)
    train, _ = build_examples(small, tokenizer)
    assert len(train) == 6 + 12
    assert "only 2 available, so each is used 6.00 times" in capsys.readouterr().out


def test_replay_paths_are_told_apart(tmp_path):
    eva = tmp_path / "eva.txt"
    eva.write_text("你好\t你好，很高兴认识你。\n", encoding="utf-8")
    json_text = tmp_path / "text.jsonl"
    json_text.write_text(json.dumps({"text": "春天来了"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert holds_dialogues(str(eva)) and holds_dialogues(write_conversations(tmp_path / "d.jsonl"))
    assert not holds_dialogues(write_texts(tmp_path / "t.txt")) and not holds_dialogues(str(json_text))


def test_pretraining_blocks_are_cached(tmp_path, tokenizer, counted_calls, capsys):
    corpus = [write_texts(tmp_path / "t.txt")]
    cache = DataCacheConfig(cache_dir=str(tmp_path / "cache"))
    first = block_dataset(tokenizer, corpus, 16, False, cache)
    counted_calls.clear()
    second = block_dataset(tokenizer, corpus, 16, False, cache)
    assert counted_calls["tokenize"] == 0 and "cache hit: blocks data" in capsys.readouterr().out
    uncached = block_dataset(tokenizer, corpus, 16, False, DataCacheConfig(cache=False))
    assert first["input_ids"] == second["input_ids"] == uncached["input_ids"]


def test_no_cache_flag(tmp_path):
    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)
    assert config_from_args(SftConfig, parser.parse_args(["--no-cache"])).cache is False
    assert config_from_args(SftConfig, parser.parse_args(["--cache-dir", "x"])).cache is True


def test_sft_with_replay_end_to_end(tmp_path, tiny_model_dir, tokenizer):
    kept = sum(n <= 32 for n in full_lengths(tokenizer))
    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir, "--data", write_conversations(tmp_path / "d.jsonl"),
                 "--replay-data", write_texts(tmp_path / "t.txt"), "--replay-ratio", "0.4", "--max-seq-length", "32",
                 "--skip-overlength", "--epochs", "1", "--batch-size", "3", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["steps"] == -(-(kept + round(0.4 * kept)) // 3)
