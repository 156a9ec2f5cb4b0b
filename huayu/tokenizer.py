"""Training Chinese tokenizers (one token per character, or byte-level BPE) in Hugging Face format.

The result is a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json), so any
code that calls `AutoTokenizer.from_pretrained(dir)` can load it; the chat template travels with it.

Encoding never adds <s> or </s> on its own (the post-processor adds nothing, so
`add_special_tokens=True` is a no-op): huayu's data code places them explicitly, which keeps
sequence packing and chat rendering free of duplicated or missing boundary tokens.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from huayu.config import ConfigError
from huayu.data.commands import parse_role_map
from huayu.data.formats import ReadResult, dialogue_texts, read_dialogues, read_texts
from huayu.data.sources import corpus_files, holds_dialogues
from huayu.data.span_corruption import sentinel_tokens
from huayu.data.templates import (ASSISTANT, BOS, DEFAULT_CHAT_TEMPLATE, EOS, MASK, PAD, SEP, SPECIAL_TOKENS,
                                  SYSTEM, UNK, USER)
from huayu.errors import DataError, HuayuError
from huayu.outputs import OVERWRITE_HELP, building, check_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

KINDS = ("char", "bpe")
BYTE_ALPHABET_SIZE = 256
META_FILE = "huayu_tokenizer.yaml"
COMMAND = "tokenizer train"
HEAD_LINES = 100  # lines of every JSONL/text input read before the long pass, to fail at once on a bad file


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


Reader = Callable[[Path, bool, bool], ReadResult]  # (input, holds dialogues, skip_invalid) -> its records


def iter_corpus_texts(paths: list[str], text_field: str | None = None, skip_invalid: bool = False,
                      role_map: dict[str, str] | None = None) -> Iterator[str]:
    """Every text a tokenizer should see: each message of a dialogue file, else each text and target
    of a corpus file. The first lines of every input are checked now, so that a bad last file fails
    before the long pass over the others; the texts are then read one input at a time."""
    def read(path: Path, dialogue: bool, skip: bool) -> ReadResult:
        if dialogue:
            return read_dialogues(path, role_map=role_map, skip_invalid=skip)
        return read_texts(path, text_field=text_field, skip_invalid=skip)

    inputs = corpus_inputs(paths)
    for path, dialogue in inputs:
        check_first_records(path, dialogue, read, skip_invalid)
    return _texts(inputs, read, skip_invalid)


def _texts(inputs: list[tuple[Path, bool]], read: Reader, skip_invalid: bool) -> Iterator[str]:
    for path, dialogue in inputs:
        result = read(path, dialogue, skip_invalid)
        if result.skipped:
            print(f"{path}: skipped {result.skipped} invalid record(s)", file=sys.stderr)
        yield from dialogue_texts(result)


def corpus_inputs(paths: list[str]) -> list[tuple[Path, bool]]:
    """(input, whether it holds dialogues) for every path: a directory of corpus files stands for
    every corpus file under it (corpus_files), an EVA directory for its train split."""
    inputs = []
    for path in map(Path, paths):
        if _is_dialogue(path):
            inputs.append((path, True))
        else:
            inputs += [(file, False) for file in corpus_files(path)]
    return inputs


def _is_dialogue(path: Path) -> bool:
    """Whether `path` holds dialogues rather than a text corpus (holds_dialogues). A `.txt` file is
    read as plain text even when it is EVA's: tab-separated turns tokenize the same as their line."""
    is_txt = path.is_file() and path.name.lower().removesuffix(".gz").endswith(".txt")
    return not is_txt and holds_dialogues(str(path))


def check_first_records(path: Path, dialogue: bool, read: Reader, skip_invalid: bool) -> None:
    """Read the first HEAD_LINES lines of `path` as the long pass will, so that a wrong format or an
    unmapped role stops the run at once with the file and line. With skip_invalid, invalid records
    there are an error only when no valid one is among them: the whole file would be skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        head = _head(path, Path(tmp))
        try:
            if skip_invalid and read(head or path, dialogue, True).records:
                return
            read(head or path, dialogue, False)
        except DataError as exc:
            if head is None:
                raise
            kept = f" (no valid record in its first {HEAD_LINES} lines to keep with --skip-invalid)"
            raise DataError(path, exc.where, exc.reason + (kept if skip_invalid else "")) from None


def _head(path: Path, into: Path) -> Path | None:
    """The first HEAD_LINES lines of a JSONL or text file, copied into `into` under its name without
    .gz, so the reader takes them for the same format and numbers their lines alike; None for what
    is read whole anyway (a JSON list, YAML, a directory) or cannot be read (the reader says why)."""
    compressed = path.name.lower().endswith(".gz")
    name = path.name[:-3] if compressed else path.name
    if not (path.is_file() and name.lower().endswith((".jsonl", ".json", ".txt"))):
        return None
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            lines = list(islice(f, HEAD_LINES))
    except OSError:
        return None
    first = next((line for line in lines if line.strip()), b"").lstrip(b"\xef\xbb\xbf \t")
    if first.startswith(b"["):  # a JSON list parses only whole
        return None
    head = into / name
    head.write_bytes(b"".join(lines))
    return head


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
                        help="corpus files (.txt lines, .jsonl texts, or any dialogue format) or directories of "
                             "corpus files (read with their subdirectories)")
    parser.add_argument("--kind", choices=KINDS, default="char",
                        help="one token per character, or byte-level BPE (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="vocabulary size, special tokens and sentinels included (default: %(default)s)")
    parser.add_argument("--min-frequency", type=int, default=1,
                        help="char: minimum count of a kept character; bpe: minimum count of a merge "
                             "(default: %(default)s)")
    parser.add_argument("--text-field", help="JSON field holding the text (default: text, src_txt or content, "
                                             "whichever the first record has)")
    parser.add_argument("--sentinels", type=int, default=0, metavar="N",
                        help="add <extra_id_0..N-1> for span-corruption pre-training; T5 uses 100 "
                             "(default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="model_max_length saved with the tokenizer (default: %(default)s)")
    parser.add_argument("--role-map", type=parse_role_map, default=None, metavar="SRC=ROLE,...",
                        help="map dialogue roles, e.g. client=user,counselor=assistant (default: only "
                             "user/assistant/system and human/gpt/bot are known)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    parser.add_argument("--out", required=True,
                        help="output directory: new, empty, or an earlier tokenizer train output, which is "
                             "replaced once the new tokenizer is complete")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_train(args: argparse.Namespace) -> int:
    check_output_dir(args.out, COMMAND, args.overwrite)
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
    """The tokenizer and its training record, installed at `out` only when complete (outputs.building)."""
    with building(out, COMMAND) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, allow_unicode=True, sort_keys=False), encoding="utf-8")


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
