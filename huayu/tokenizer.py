"""Training Chinese tokenizers (one token per character, or byte-level BPE) in Hugging Face format.

The result is a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json), so any
code that calls `AutoTokenizer.from_pretrained(dir)` can load it; the chat template travels with it.

Encoding never adds <s> or </s> on its own (the post-processor adds nothing, so
`add_special_tokens=True` is a no-op): huayu's data code places them explicitly, which keeps
sequence packing and chat rendering free of duplicated or missing boundary tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from huayu.config import ConfigError
from huayu.data.commands import parse_role_map
from huayu.data.formats import DIALOGUE_FORMATS, detect_format, dialogue_texts, read_dialogues, read_texts
from huayu.data.span_corruption import sentinel_tokens
from huayu.data.templates import (ASSISTANT, BOS, DEFAULT_CHAT_TEMPLATE, EOS, MASK, PAD, SEP, SPECIAL_TOKENS,
                                  SYSTEM, UNK, USER)
from huayu.errors import DataError, HuayuError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

KINDS = ("char", "bpe")
BYTE_ALPHABET_SIZE = 256
META_FILE = "huayu_tokenizer.yaml"


def train_tokenizer(texts: Iterable[str], kind: str = "char", vocab_size: int = 8000,
                    min_frequency: int = 1, model_max_length: int = 1024,
                    sentinels: int = 0) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`; the special tokens take the first ids (<pad> = 0).

    `sentinels` adds the span-corruption sentinels <extra_id_0> ... <extra_id_{N-1}> as special
    tokens right after huayu's own, so <extra_id_i> has id len(SPECIAL_TOKENS) + i. `vocab_size`
    counts every special token, sentinels included: it stays the size of the model's embedding, and
    sentinels take their room from learned characters or merges.
    `char` keeps the most frequent characters seen at least `min_frequency` times and maps the rest
    to <unk>; `bpe` learns merges over UTF-8 bytes.
    """
    _check_options(kind, vocab_size, min_frequency, sentinels)
    extra = sentinel_tokens(sentinels)
    build = _char_tokenizer if kind == "char" else _bpe_tokenizer
    backend = build(texts, vocab_size, min_frequency, SPECIAL_TOKENS + extra)
    return _wrap(backend, model_max_length, extra)


def _check_options(kind: str, vocab_size: int, min_frequency: int, sentinels: int) -> None:
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if sentinels < 0:
        raise ConfigError(f"sentinels must be at least 0, got {sentinels}")
    smallest = len(SPECIAL_TOKENS) + sentinels + (1 if kind == "char" else BYTE_ALPHABET_SIZE)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size {vocab_size} is too small for a {kind} tokenizer with {sentinels} "
                          f"sentinels (minimum {smallest})")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")


def _char_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str]):
    """Every code point (letters, digits, spaces and newlines included) is one token.

    No normalizer and a decoder that concatenates tokens, so decoding gives back the exact text
    rather than characters joined by spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str]):
    """Byte-level BPE (GPT-2 style), chosen over character BPE with byte fallback.

    Its base alphabet is the 256 bytes, so no text is ever <unk> and decoding is exact for any
    input, with the `tokenizers` library's own ByteLevel pre-tokenizer and decoder. Character BPE
    would need a base alphabet of every Chinese character in the corpus (thousands, eating into a
    small vocabulary) plus 256 hand-added <0xNN> fallback tokens. The cost is that a character
    without a learned merge takes two to four byte tokens; with a few thousand merges the common
    Chinese characters become single tokens. `add_prefix_space=False` keeps leading text unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _wrap(backend, model_max_length: int, sentinels: list[str]) -> PreTrainedTokenizerFast:
    """Give the backend its special tokens, chat template and the settings saved with it.

    Right padding is the saved default; generation code switches to left padding itself.
    `clean_up_tokenization_spaces=False` stops decode from deleting spaces before punctuation.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS, mask_token=MASK,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT, SEP, *sentinels],
        add_bos_token=False, add_eos_token=False,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )


def iter_corpus_texts(paths: list[str], text_field: str | None = None, skip_invalid: bool = False,
                      role_map: dict[str, str] | None = None) -> Iterator[str]:
    """Yield every text a tokenizer should see: each message of a dialogue file, else each text and
    target of a corpus file."""
    for path in paths:
        if _is_dialogue(Path(path)):
            result = read_dialogues(path, role_map=role_map, skip_invalid=skip_invalid)
        else:
            result = read_texts(path, text_field=text_field, skip_invalid=skip_invalid)
        if result.skipped:
            print(f"{path}: skipped {result.skipped} invalid record(s)", file=sys.stderr)
        yield from dialogue_texts(result)


def _is_dialogue(path: Path) -> bool:
    """Whether `path` is an EVA directory or a file in a dialogue format detect_format recognizes.

    A `.txt` file is read as plain text although detect_format calls it EVA: tab-separated turns
    tokenize the same as the line they sit on. A file detect_format cannot place (e.g. JSONL with
    a "text" field) is taken as a corpus; read_texts reports it if it is not one either.
    """
    if path.is_file() and path.name.lower().removesuffix(".gz").endswith(".txt"):
        return False
    try:
        return detect_format(path) in DIALOGUE_FORMATS
    except DataError:
        return False


class _CorpusStats:
    """Counts texts and characters while the trainer consumes the stream, so files are read once."""

    def __init__(self) -> None:
        self.texts = 0
        self.chars: Counter[str] = Counter()
        self.first: str | None = None

    def track(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.texts += 1
            self.chars.update(text)
            if self.first is None:
                self.first = text
            yield text

    def unk_share(self, tokenizer: PreTrainedTokenizerFast) -> float:
        """Share of the corpus characters that encode to <unk> (0 for byte-level BPE)."""
        distinct = list(self.chars)
        encodings = tokenizer.backend_tokenizer.encode_batch(distinct, add_special_tokens=False)
        unknown = sum(self.chars[char] for char, enc in zip(distinct, encodings)
                      if tokenizer.unk_token_id in enc.ids)
        return unknown / max(1, self.chars.total())


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="corpus files (.txt lines, .jsonl texts, or any dialogue format)")
    parser.add_argument("--kind", choices=KINDS, default="char", help="one token per character, or byte-level BPE")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="vocabulary size, special tokens and sentinels included")
    parser.add_argument("--min-frequency", type=int, default=1,
                        help="char: minimum count of a kept character; bpe: minimum count of a merge")
    parser.add_argument("--text-field", help="JSON field holding the text (default: auto-detect)")
    parser.add_argument("--sentinels", type=int, default=0, metavar="N",
                        help="add <extra_id_0..N-1> for span-corruption pre-training (T5 uses 100)")
    parser.add_argument("--max-length", type=int, default=1024, help="model_max_length saved with the tokenizer")
    parser.add_argument("--role-map", type=parse_role_map, default=None, metavar="SRC=ROLE,...",
                        help="map dialogue roles, e.g. client=user,counselor=assistant")
    parser.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    parser.add_argument("--out", required=True, help="output directory (replaced only after success)")


def run_train(args: argparse.Namespace) -> int:
    stats = _CorpusStats()
    texts = iter_corpus_texts(args.data, text_field=args.text_field, skip_invalid=args.skip_invalid,
                              role_map=args.role_map)
    progress = tqdm(stats.track(texts), desc="reading texts", unit=" texts", disable=None)
    tokenizer = train_tokenizer(progress, kind=args.kind, vocab_size=args.vocab_size,
                                min_frequency=args.min_frequency, model_max_length=args.max_length,
                                sentinels=args.sentinels)
    progress.close()
    if not stats.texts:
        raise HuayuError(f"no text found in {', '.join(args.data)}")
    unk_share = stats.unk_share(tokenizer)
    meta = {
        "kind": args.kind, "vocab_size": len(tokenizer), "requested_vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency, "model_max_length": args.max_length, "sentinels": args.sentinels,
        "text_field": args.text_field, "skip_invalid": args.skip_invalid,
        "sources": list(args.data),
        "texts": stats.texts, "chars": stats.chars.total(), "unk_share": round(unk_share, 6),
    }
    _save(tokenizer, meta, Path(args.out))
    _report(tokenizer, stats, unk_share, args.out)
    return 0


def _save(tokenizer: PreTrainedTokenizerFast, meta: dict, out: Path) -> None:
    """Write into a temporary sibling directory, then swap it in, so a failure never leaves a half
    written tokenizer and an existing output survives until the new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, allow_unicode=True, sort_keys=False), encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and restored if that fails."""
    if not out.exists():
        new.rename(out)
        return
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    out.rename(trash / out.name)
    try:
        new.rename(out)
    except OSError:
        (trash / out.name).rename(out)
        raise
    finally:
        if out.exists():  # the new output, or the old one restored: either way `trash` is disposable
            shutil.rmtree(trash, ignore_errors=True)


def _report(tokenizer: PreTrainedTokenizerFast, stats: _CorpusStats, unk_share: float, out: str) -> None:
    """Print what a user checks before training a model: size, corpus volume, coverage, a sample."""
    sample = stats.first[:40]
    ids = tokenizer.encode(sample)
    pieces = [tokenizer.decode([i]) for i in ids]
    print(f"vocab size: {len(tokenizer)}")
    print(f"texts: {stats.texts} ({stats.chars.total()} characters)")
    print(f"<unk> characters: {unk_share:.2%} (coverage {1 - unk_share:.2%})")
    print(f"sample: {sample!r}\n  tokens: {pieces}\n  ids: {ids}")
    print(f"saved to {out}")
