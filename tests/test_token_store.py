"""huayu.data.token_store: `huayu data index` round trip, word starts, split, parallel build, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from huayu.cli import main
from huayu.data import token_store
from huayu.data.token_store import IndexConfig, TokenStore, build_store, split_documents, split_sentences
from huayu.errors import HuayuError

DOCUMENTS = ["春天来了，花都开了。我们一起去公园散步吧！", "学习使人进步。读书让人快乐；问题和答案。",
             "你好，很高兴认识你。", "今天天气很好，适合出去走走。那就好好休息一下吧。晚安，做个好梦。"]


def write_corpus(path, documents) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return str(path)


def index(tmp_path, tokenizer_dir, documents, name="store", *flags) -> TokenStore:
    corpus = write_corpus(tmp_path / f"{name}.jsonl", documents)
    prefix = str(tmp_path / name)
    assert main(["data", "index", corpus, "--out", prefix, "--tokenizer", tokenizer_dir, *flags]) == 0
    return TokenStore(prefix)


def test_sentences_end_at_final_punctuation_quotes_and_line_breaks():
    assert split_sentences("他说：“好。”然后走了！真的？\n第二行") == ["他说：“好。”", "然后走了！", "真的？", "第二行"]
    assert split_sentences("没有句号") == ["没有句号"]
    assert split_sentences("  \n\n ") == []


def test_store_round_trips_documents_sentences_and_words(tmp_path, tokenizer_dir, tokenizer):
    import rjieba

    store = index(tmp_path, tokenizer_dir, DOCUMENTS * 3)
    assert store.n_documents == 12 and store.meta["empty_documents"] == 0
    assert store.ids.dtype == np.uint16 and len(store.ids) == len(store.words) == store.meta["tokens"]
    for doc, text in enumerate(DOCUMENTS * 3):
        sentences = split_sentences(text)
        ranges = store.sentence_ranges(doc)
        assert len(ranges) == len(sentences)
        for (start, end), sentence in zip(ranges, sentences):
            assert store.ids[start:end].tolist() == tokenizer(sentence, add_special_tokens=False)["input_ids"]
            # char tokenizer: one token per character, so word starts sit at the segmenter's word boundaries
            boundaries = np.cumsum([0] + [len(w) for w in rjieba.cut(sentence)])[:-1]
            assert np.flatnonzero(store.words[start:end]).tolist() == boundaries.tolist()


def test_empty_or_bad_documents_are_errors_or_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "你好。"}\n{"text": ""}\n{"text": "   "}\nnot json\n{"text": "晚安。"}\n', encoding="utf-8")
    args = ["data", "index", str(corpus), "--out", str(tmp_path / "s"), "--tokenizer", tokenizer_dir]
    assert main(args) == 1
    assert "c.jsonl: line 2" in capsys.readouterr().err
    assert main(args + ["--skip-invalid"]) == 0
    assert "skipped 3 invalid records" in capsys.readouterr().out
    store = TokenStore(tmp_path / "s")
    assert store.n_documents == 2 and store.meta["empty_documents"] == 0


def test_parallel_build_equals_a_single_process_one(tmp_path, tokenizer_dir):
    docs = DOCUMENTS * 40
    one = index(tmp_path, tokenizer_dir, docs, "one", "--chunk-mb", "0.001")
    two = index(tmp_path, tokenizer_dir, docs, "two", "--chunk-mb", "0.001", "--workers", "2")
    for name in ("ids", "words", "sentence_offsets", "document_offsets"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name


def test_split_is_deterministic_disjoint_and_proportional():
    train, valid, test = split_documents(1000, "949,50,1", seed=7)
    assert (len(train), len(valid), len(test)) == (949, 50, 1)
    assert np.array_equal(np.sort(np.concatenate([train, valid, test])), np.arange(1000))
    again = split_documents(1000, "949,50,1", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    assert not np.array_equal(valid, split_documents(1000, "949,50,1", seed=8)[1])
    assert [len(p) for p in split_documents(10, "8,2", seed=0)] == [8, 2, 0]
    with pytest.raises(HuayuError, match="--split"):
        split_documents(10, "1,x", seed=0)


def test_an_interrupted_build_resumes_from_its_parts(tmp_path, tokenizer_dir, monkeypatch):
    docs = DOCUMENTS * 30
    cfg = IndexConfig(corpus=[str(tmp_path / "c.jsonl")], out=str(tmp_path / "store"), tokenizer=tokenizer_dir,
                      chunk_mb=0.0005)
    write_corpus(cfg.corpus[0], docs)
    encode, calls = token_store._encode_chunk, []

    def dies_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job[0])
        return encode(job)

    monkeypatch.setattr(token_store, "_encode_chunk", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_store(cfg, docs, [])
    assert not token_store.is_store(cfg.out)  # no metadata: not a usable store yet
    (parts,) = tmp_path.glob("store.parts-*")
    assert len(list(parts.glob("part-*.npz"))) == 3

    monkeypatch.setattr(token_store, "_encode_chunk", encode)
    notes: list[str] = []
    build_store(cfg, docs, notes)
    assert any(note.startswith("resuming: 3 of") for note in notes)
    assert not parts.exists()
    resumed = TokenStore(cfg.out)
    fresh = index(tmp_path, tokenizer_dir, docs, "fresh")
    assert np.array_equal(resumed.ids, fresh.ids) and np.array_equal(resumed.words, fresh.words)
    assert np.array_equal(resumed.sentence_offsets, fresh.sentence_offsets)


def test_segmenter_must_keep_every_character(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import types
    import sys

    monkeypatch.setitem(sys.modules, "lossy", types.SimpleNamespace(cut=lambda text: text.split("，")))
    corpus = write_corpus(tmp_path / "c.jsonl", DOCUMENTS)
    assert main(["data", "index", corpus, "--out", str(tmp_path / "s"), "--tokenizer", tokenizer_dir,
                 "--segmenter", "lossy:cut"]) == 1
    assert "must keep every character" in capsys.readouterr().err


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(HuayuError, match="not a token store"):
        TokenStore(tmp_path / "nothing")
