"""huayu.tokenizer: exact round trips, special tokens, chat template, saving and the CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from huayu.cli import main
from huayu.config import ConfigError
from huayu.data.templates import ASSISTANT, EOS, SPECIAL_TOKENS, USER
from huayu.tokenizer import iter_corpus_texts, train_tokenizer

MIXED = "你好，世界！Hello 123 abc.\n今天天气很好；  明天见?\t再见 (2024)\n"
CORPUS = [MIXED, "我们在学习中文。", "他说：“没问题！”", "It's 3.5, isn't it? Latin and Greek letters"] * 5
# Made only of characters in CORPUS, so even the char tokenizer has no <unk> here.
ROUND_TRIP = [MIXED, "  你好  ", "\n\n天气\n", "a , b . c ' d", "中文 and Latin, 123?"]


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(CORPUS, kind="char", vocab_size=500)


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=400)


@pytest.fixture(params=["char", "bpe"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def test_round_trip_is_exact(tok):
    for text in ROUND_TRIP:
        assert tok.unk_token_id not in tok.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_char_kind_gives_one_token_per_character(char_tok):
    assert len(char_tok.encode(MIXED)) == len(MIXED)


def test_bpe_round_trips_unseen_text_without_unk(bpe_tok):
    text = "龘靐 ünïcödé 🐉 ½"
    ids = bpe_tok.encode(text)
    assert bpe_tok.unk_token_id not in ids
    assert bpe_tok.decode(ids) == text


def test_char_unseen_characters_are_unk(char_tok):
    ids = char_tok.encode("你龘好")
    assert ids[1] == char_tok.unk_token_id
    assert char_tok.unk_token_id not in (ids[0], ids[2])


def test_special_tokens_take_first_ids(tok):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.unk_token, tok.bos_token, tok.eos_token) == (0, "<unk>", "<s>", "</s>")


def test_special_tokens_are_never_split_and_skipped_on_decode(tok):
    for special in SPECIAL_TOKENS:
        ids = tok.encode(f"你{special}好")
        assert tok.convert_tokens_to_ids(special) in ids
        assert tok.decode(ids) == f"你{special}好"
        assert tok.decode(ids, skip_special_tokens=True) == "你好"


def test_encode_adds_no_bos_or_eos(tok):
    assert tok("你好", add_special_tokens=True)["input_ids"] == tok.encode("你好", add_special_tokens=False)
    assert tok.bos_token_id not in tok.encode("你好")


def test_chat_template(char_tok):
    prompt = char_tok.apply_chat_template([{"role": "user", "content": "你好"}],
                                          tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>你好</s><|assistant|>"
    ids = char_tok.convert_tokens_to_ids([USER, "你", "好", EOS, ASSISTANT])
    assert char_tok.encode(prompt) == ids


def test_vocab_size_cap_keeps_most_frequent_characters():
    tok = train_tokenizer(["aaaabbbcc d"], kind="char", vocab_size=len(SPECIAL_TOKENS) + 3)
    assert len(tok) == len(SPECIAL_TOKENS) + 3
    assert tok.decode(tok.encode("abc")) == "abc"
    assert tok.encode("d") == [tok.unk_token_id]


def test_min_frequency_drops_rare_characters():
    tok = train_tokenizer(["aab"], kind="char", min_frequency=2)
    assert tok.encode("ab") == [tok.convert_tokens_to_ids("a"), tok.unk_token_id]


def test_bpe_vocab_size_cap():
    assert len(train_tokenizer(CORPUS * 10, kind="bpe", vocab_size=300)) <= 300


@pytest.mark.parametrize("kind, vocab_size", [("char", len(SPECIAL_TOKENS)), ("bpe", 100), ("word", 8000)])
def test_bad_options_are_config_errors(kind, vocab_size):
    with pytest.raises(ConfigError):
        train_tokenizer(CORPUS, kind=kind, vocab_size=vocab_size)


def test_saved_tokenizer_reloads_with_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = f"{USER}{MIXED}{EOS}{ASSISTANT}"
    assert loaded.encode(prompt) == tok.encode(prompt)
    assert loaded.decode(loaded.encode(MIXED)) == MIXED
    assert (loaded.pad_token_id, loaded.padding_side, loaded.model_max_length) == (0, "right", 1024)
    assert loaded.chat_template == tok.chat_template


def _jsonl(path, *records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_iter_corpus_texts_reads_lines_texts_targets_and_messages(tmp_path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_text("第一行\t还是第一行\n第二行\n", encoding="utf-8")
    corpus = _jsonl(tmp_path / "b.jsonl", {"src_txt": "问", "tgt_txt": "答"}, "{broken")
    chat = _jsonl(tmp_path / "c.jsonl", {"messages": [{"role": "user", "content": "你好"},
                                                      {"role": "assistant", "content": "您好"}]})
    texts = list(iter_corpus_texts([str(txt), corpus, chat], skip_invalid=True))
    assert texts == ["第一行\t还是第一行", "第二行", "问", "答", "你好", "您好"]
    assert "skipped 1" in capsys.readouterr().err


COUNSELLING = {"conversation": [{"role": "client", "content": "你好"}, {"role": "counselor", "content": "您好"}]}


@pytest.fixture
def files_read_whole(monkeypatch):
    """The paths huayu.tokenizer hands to its readers, in order."""
    import huayu.tokenizer as module

    paths = []

    def spy(reader):
        def read(path, *args, **kwargs):
            paths.append(path)
            return reader(path, *args, **kwargs)
        return read

    for name in ("read_texts", "read_dialogues"):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    return paths


def test_a_bad_last_file_stops_the_run_before_the_others_are_read(tmp_path, files_read_whole, capsys):
    big = tmp_path / "big.txt"
    big.write_text("很长的语料。\n" * 500, encoding="utf-8")
    chat = _jsonl(tmp_path / "chat.jsonl", COUNSELLING)
    assert main(["tokenizer", "train", "--data", str(big), chat, "--out", str(tmp_path / "tok")]) == 1
    assert f"{chat}: line 1: turn 1: unknown role 'client'; map it with --role-map" in capsys.readouterr().err
    assert str(big) not in map(str, files_read_whole)  # only its first lines were read, from a copy
    assert not (tmp_path / "tok").exists()


def test_skip_invalid_still_stops_a_file_whose_first_records_are_all_invalid(tmp_path, capsys):
    def train(data, *options):
        return main(["tokenizer", "train", "--data", data, "--skip-invalid", "--out", str(tmp_path / "tok"), *options])

    roles = ["--role-map", "client=user,counselor=assistant"]
    assert train(_jsonl(tmp_path / "chat.jsonl", *[COUNSELLING] * 3)) == 1
    assert "no valid record in its first 100 lines to keep with --skip-invalid" in capsys.readouterr().err
    assert train(_jsonl(tmp_path / "mixed.jsonl", {"conversation": []}, *[COUNSELLING] * 2), *roles) == 0
    captured = capsys.readouterr()
    assert "texts: 4" in captured.out and "skipped 1 invalid record(s)" in captured.err


def test_a_directory_is_read_with_its_subdirectories_in_path_order(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deeper").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "a.txt").write_text("甲\n", encoding="utf-8")
    (corpus / "b" / "c.txt").write_text("乙\n", encoding="utf-8")
    _jsonl(corpus / "b" / "deeper" / "d.jsonl", {"text": "丙"})
    (corpus / ".git" / "x.txt").write_text("不要\n", encoding="utf-8")
    assert list(iter_corpus_texts([str(corpus)])) == ["甲", "乙", "丙"]
    assert f"{corpus}: 3 corpus files (subdirectories included)" in capsys.readouterr().out


def test_cli_trains_saves_and_replaces_output(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("你好，世界！\n今天天气很好。\nhello 123\n", encoding="utf-8")
    out = tmp_path / "tok"
    train = ["tokenizer", "train", "--data", str(corpus), "--out", str(out)]
    assert main(train + ["--kind", "char", "--vocab-size", "100"]) == 0
    assert main(train + ["--kind", "bpe", "--vocab-size", "300"]) == 0  # replaces the char output

    meta = yaml.safe_load((out / "huayu_tokenizer.yaml").read_text(encoding="utf-8"))
    assert meta["kind"] == "bpe" and meta["texts"] == 3 and meta["sources"] == [str(corpus)]
    assert meta["chars"] == len("你好，世界！今天天气很好。hello 123")
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok"]  # no temporary dirs left
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.decode(loaded.encode("你好，世界！")) == "你好，世界！"
    printed = capsys.readouterr().out
    assert "vocab size:" in printed and "texts: 3" in printed


def test_cli_reports_an_empty_corpus(tmp_path, capsys):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("", encoding="utf-8")
    argv = ["tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "tok")]
    assert main(argv) == 1
    assert "no text found" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


SENTINELS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]  # T5/mT5 names


@pytest.mark.parametrize("kind, vocab_size", [("char", 500), ("bpe", 400)])
def test_sentinels_are_special_tokens_after_huayus_own(kind, vocab_size, tmp_path):
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=vocab_size, sentinels=3)
    first = len(SPECIAL_TOKENS)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tok, loaded):
        assert t.convert_tokens_to_ids(SPECIAL_TOKENS + SENTINELS) == list(range(first + 3))
        assert set(SENTINELS) <= set(t.all_special_tokens)
        ids = t.encode(f"你{SENTINELS[1]}好")
        assert ids.count(first + 1) == 1 and t.decode(ids) == f"你{SENTINELS[1]}好"  # one token, never split
        assert t.decode(ids, skip_special_tokens=True) == "你好"
        plain = t.encode("<extra_id_0 extra_id_1> <extra_id_>")  # look-alike text is never a sentinel
        assert not set(plain) & set(range(first, first + 3))


def test_vocab_size_counts_sentinels():
    tok = train_tokenizer(["aaaabbbcc d"], kind="char", vocab_size=len(SPECIAL_TOKENS) + 5, sentinels=2)
    assert len(tok) == len(SPECIAL_TOKENS) + 5
    assert tok.encode("abcd") == tok.convert_tokens_to_ids(["a", "b", "c", tok.unk_token])


@pytest.mark.parametrize("vocab_size, sentinels", [(len(SPECIAL_TOKENS) + 3, 3), (500, -1)])
def test_bad_sentinel_options_are_config_errors(vocab_size, sentinels):
    with pytest.raises(ConfigError, match="sentinels"):
        train_tokenizer(CORPUS, kind="char", vocab_size=vocab_size, sentinels=sentinels)


def test_cli_sentinels_option(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("你好，世界！\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus), "--out", str(out), "--sentinels", "100"]) == 0
    assert yaml.safe_load((out / "huayu_tokenizer.yaml").read_text(encoding="utf-8"))["sentinels"] == 100
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.convert_tokens_to_ids("<extra_id_99>") == len(SPECIAL_TOKENS) + 99


@pytest.mark.parametrize("name", ["llama", "mt5"])
def test_a_sentencepiece_checkpoints_tokenizer_loads_from_its_model_file_and_converted(name, tmp_path):
    """Chinese Llama-2 and mT5 (as ChatGLM3 and Baichuan2) ship a sentencepiece model file, often
    without tokenizer.json: it loads (converted through sentencepiece and protobuf), its converted
    copy loads the same, and both tokenize exactly as sentencepiece itself does."""
    import sentencepiece
    from hub_checkpoints import CORPUS, SHAPES, write_vocabulary_file

    from huayu.models.loading import load_tokenizer

    slow = tmp_path / "slow"
    slow.mkdir()
    write_vocabulary_file(SHAPES[name], slow)
    (model_file,) = slow.glob("*.model")
    spm = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    from_model_file = load_tokenizer(str(slow))
    from_model_file.save_pretrained(tmp_path / "fast")
    converted = load_tokenizer(str(tmp_path / "fast"))
    assert (tmp_path / "fast" / "tokenizer.json").exists()
    for text in CORPUS + ["没见过的字：龘"]:
        ids = spm.encode(text)
        assert from_model_file(text, add_special_tokens=False)["input_ids"] == ids
        assert converted(text, add_special_tokens=False)["input_ids"] == ids


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    """Llama's tokenizer has no pad token: batches are padded with eos, and the padding is masked
    and carries no loss, so the eos that ends a reply is still learned where it really is."""
    from hub_checkpoints import SHAPES, write_vocabulary_file

    from huayu.data.batching import IGNORE, Example
    from huayu.models.families import DECODER
    from huayu.models.loading import load_tokenizer

    write_vocabulary_file(SHAPES["llama"], tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "</s>"
    eos = tok.eos_token_id
    batch = DECODER.collate(tok.pad_token_id)([Example([5, 6, eos], [5, 6, eos]), Example([7, eos], [7, eos])])
    assert batch["input_ids"][1].tolist() == [7, eos, eos]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0] and batch["labels"][1].tolist() == [7, eos, IGNORE]
