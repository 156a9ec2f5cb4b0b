"""Tokenized examples cached on disk as Arrow files, so a corpus is tokenized once (as ChatGLM-Tuning does).

An entry's key is a hash of everything its content depends on: the data files, the reading and
length options, the tokenizer and CACHE_VERSION. Changing any of them gives a new key, so a stale
entry is never read (old entries stay until the user deletes them). Files are keyed by content when
they are small (exact, and cheap to hash) and by size + mtime otherwise: re-reading a corpus of
gigabytes on every run would cost more than the cache saves, and any rewrite changes the mtime.

An entry is one Arrow file written batch by batch with pyarrow and memory-mapped back with
`datasets.Dataset.from_file`, so neither building nor training holds a large corpus in RAM. It is
written under a temporary name and renamed into place, so a killed run never leaves half an entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from huayu.config import field_doc
from huayu.data.batching import Example

CACHE_VERSION = 2  # bump whenever the encoding of examples changes, so older entries are not read
CONTENT_HASH_LIMIT = 64 * 2**20  # files up to this many bytes are keyed by their content
DEFAULT_CACHE_DIR = "~/.cache/huayu/datasets"
EXAMPLES_FILE = "examples.arrow"
META_FILE = "huayu.json"  # the key's parts and the build's report; written last, marks a complete entry
ROWS_PER_BATCH = 1000

Build = Callable[[list], Iterable[Example]]  # build(notes) -> examples; report lines go to `notes`


@dataclass
class DataCacheConfig:
    """The cache options of a command that tokenizes data (mixed into its config)."""

    cache: bool = field_doc("reuse tokenized data cached on disk (--no-cache: tokenize on every run)", default=True)
    cache_dir: str | None = field_doc(f"where tokenized data is cached (default: $HUAYU_CACHE or {DEFAULT_CACHE_DIR})",
                                      default=None)


def add_no_cache_flag(parser: argparse.ArgumentParser) -> None:
    """`--no-cache`, the usual spelling of `--cache false`."""
    parser.add_argument("--no-cache", dest="cache", action="store_false", default=argparse.SUPPRESS,
                        help="tokenize the data on every run instead of caching it")


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("HUAYU_CACHE") or DEFAULT_CACHE_DIR).expanduser()


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprints(paths: list[str]) -> list[dict]:
    """Every file under `paths` (directories recursively) with its content hash or size + mtime.

    A missing path is recorded as such; reading it is what reports the error."""
    prints = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            entry = {"path": str(file.resolve())}
            if file.is_file():
                stat = file.stat()
                entry["size"] = stat.st_size
                if stat.st_size <= CONTENT_HASH_LIMIT:
                    entry["sha256"] = _file_digest(file)
                else:
                    entry["mtime_ns"] = stat.st_mtime_ns
            prints.append(entry)
    return prints


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids: its full serialization (vocabulary, merges,
    normalizer, added tokens) or, for a tokenizer without a fast backend, its vocabulary; its class,
    chat template and special tokens. Where it was loaded from does not count, so a copy saved in a
    checkpoint (`--resume`) finds the same entries."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest([type(tokenizer).__name__, model, tokenizer.chat_template, tokenizer.special_tokens_map])


class ArrowExamples(Sequence):
    """The `Example`s of an Arrow dataset, read from it (memory-mapped) on access."""

    def __init__(self, dataset):
        self.dataset = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self) -> list[int]:
        """Every example's token count, from the Arrow offsets (nothing is read)."""
        import pyarrow.compute as pc

        return pc.list_value_length(self.dataset.data.column("input_ids")).to_pylist()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[index]
        # writable copies: torch warns about (and must not write to) read-only memory-mapped arrays
        ids, labels = (row.column(name)[0].values.to_numpy(zero_copy_only=False, writable=True)
                       for name in ("input_ids", "labels"))
        return Example(ids, labels)


def _chunks(items: Iterable, size: int):
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def write_examples(examples: Iterable[Example], path: Path) -> None:
    """Stream `examples` into an Arrow file in batches of ROWS_PER_BATCH rows (int32 ids and labels)."""
    import pyarrow as pa

    tokens = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", tokens), ("labels", tokens)])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for chunk in _chunks(examples, ROWS_PER_BATCH):
            columns = [pa.array([e.input_ids for e in chunk], tokens), pa.array([e.labels for e in chunk], tokens)]
            writer.write_batch(pa.record_batch(columns, schema=schema))


def _build_entry(entry: Path, key: dict, build: Build) -> None:
    """Write the entry under a temporary name, then rename it into place."""
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        notes: list[str] = []
        write_examples(build(notes), tmp / EXAMPLES_FILE)
        (tmp / META_FILE).write_text(json.dumps({"key": key, "notes": notes}, ensure_ascii=False, indent=1),
                                     encoding="utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / META_FILE).exists():  # not a concurrent run having written the same entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(note)


def _uncached(build: Build):
    from datasets import Dataset

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="huayu-") as tmp:
        write_examples(build(notes), Path(tmp) / EXAMPLES_FILE)
        dataset = Dataset.from_file(str(Path(tmp) / EXAMPLES_FILE), in_memory=True)
    _print_notes(notes)
    return dataset


def cached_dataset(kind: str, paths: list[str], tokenizer, options: dict, build: Build, cache: DataCacheConfig):
    """The Arrow dataset of the examples `build(notes)` yields from `paths`, built once per key.

    `options` are every setting of the reading and encoding besides the files and the tokenizer.
    `build` appends its report lines (records skipped, examples cut or dropped, ...) to `notes`; they
    are stored with the entry and printed again on a hit, so a cached run reports what the
    tokenizing run did."""
    from datasets import Dataset

    if not cache.cache:
        return _uncached(build)
    key = {"version": CACHE_VERSION, "kind": kind, "files": file_fingerprints(paths),
           "tokenizer": tokenizer_fingerprint(tokenizer), "options": options}
    entry = cache_root(cache.cache_dir) / f"{kind}-{_digest(key)[:24]}"
    what = f"{kind} data {', '.join(paths)}"
    if (entry / META_FILE).exists():
        print(f"cache hit: {what} <- {entry}")
    else:
        print(f"tokenizing {what} (cached to {entry})")
        _build_entry(entry, key, build)
    _print_notes(json.loads((entry / META_FILE).read_text(encoding="utf-8"))["notes"])
    return Dataset.from_file(str(entry / EXAMPLES_FILE))
