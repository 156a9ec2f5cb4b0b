"""`huayu data index`: a corpus segmented into words, tokenized and stored memory-mapped.

The layout follows ERNIE's `_ids.npy` / `_idx.npz`: PREFIX_ids.npy holds every token id of every
document back to back, PREFIX_idx.npz the offsets of sentences (into the ids) and of documents
(into the sentences). PREFIX_words.npy marks the tokens that begin a word of the segmentation, so
whole-word masking needs no segmenter at training time, and PREFIX_meta.json (written last, the
mark of a complete store) records what built it. Training memory-maps the arrays: a corpus of
any size costs no RAM.

Documents are cut into chunks of about `chunk_mb` of text, processed by `workers` processes and
written as part files as they finish; a run that is interrupted resumes from the parts it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.errors import HuayuError

SEGMENTERS = ("rjieba", "jieba", "char")  # or "module:function" taking a text, returning its words
# a sentence ends at a run of these, with any closing quotes or brackets that follow; or at a line break
SENTENCE_END = re.compile(r"([。！？!?；;…]+[”’」』）)\"']*|\n+)")


@dataclass
class IndexConfig:
    corpus: list[str] = field_doc("corpus files or directories: .txt (one document a line) or JSON/JSONL, "
                                  ".gz too", positional=True, default_factory=list)
    out: str | None = field_doc("output prefix: writes PREFIX_ids.npy, PREFIX_idx.npz, PREFIX_words.npy, "
                                "PREFIX_meta.json", default=None)
    tokenizer: str | None = field_doc("tokenizer directory", default=None)
    segmenter: str = field_doc(f"word segmenter: {' | '.join(SEGMENTERS)} | module:function", default="rjieba")
    workers: int = field_doc("processes segmenting and tokenizing in parallel", default=1)
    chunk_mb: float = field_doc("MB of text per unit of work (and of resume)", default=1.0)
    text_field: str | None = field_doc("JSON field with the text (default: text, src_txt or content)",
                                       default=None)
    split: str = field_doc("train,valid,test document ratio recorded as the store's default split",
                           default="949,50,1")
    split_seed: int = field_doc("seed of the document shuffle the split cuts", default=1234)
    skip_invalid: bool = field_doc("skip malformed records (and report how many) instead of stopping",
                                   default=False)
    overwrite: bool = field_doc("replace files at PREFIX that are not a token store (an earlier store there is "
                                "always replaced)", default=False)


# ---------------------------------------------------------------- segmentation and tokenization

def segmenter(name: str):
    """The function text -> words of segmenter `name`; every character of the text is in a word."""
    if name == "rjieba":
        import rjieba
        return rjieba.cut
    if name == "jieba":
        import jieba
        jieba.setLogLevel(60)
        return jieba.lcut
    if name == "char":
        return list
    module, _, attr = name.partition(":")
    if not attr:
        raise HuayuError(f"--segmenter must be one of {', '.join(SEGMENTERS)} or module:function, got '{name}'")
    import importlib
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise HuayuError(f"--segmenter {name}: {exc}") from None


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: cut after sentence-final punctuation and at line breaks."""
    pieces = SENTENCE_END.split(text)
    sentences, current = [], ""
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            current += piece
        elif piece.startswith("\n"):
            sentences.append(current)
            current = ""
        else:
            sentences.append(current + piece)
            current = ""
    sentences.append(current)
    return [s.strip() for s in sentences if s.strip()]


class ChunkEncoder:
    """Documents -> (ids, word starts, tokens per sentence, sentences per document)."""

    def __init__(self, tokenizer_dir: str, segmenter_name: str):
        from huayu.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tokenizer.backend_tokenizer.encode_special_tokens = True  # "</s>" in a corpus is text
        self.segment = segmenter(segmenter_name)
        self.char_table = char_lookup_table(self.tokenizer)
        self.added = [t.content for t in self.tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The chunk's sentences are joined by line breaks (which no tokenizer or segmenter puts
        inside a token or word) and encoded and segmented in one call each; character offsets
        then assign every token to its sentence and say whether it begins a word."""
        doc_sentences, sentences = [], []
        for text in texts:
            found = split_sentences(text)
            doc_sentences.append(len(found))
            sentences += found
        joined = "\n".join(sentences)
        ids, starts = self.encode(joined)
        sentence_base = np.concatenate([[0], np.cumsum([len(s) + 1 for s in sentences])]).astype(np.int64)
        is_separator = np.zeros(len(joined) + 1, dtype=bool)
        is_separator[sentence_base[1:] - 1] = True  # the joining line breaks (and the end)
        inside = ~is_separator[starts]
        ids, starts = ids[inside], starts[inside]
        sentence_of = np.searchsorted(sentence_base, starts, side="right") - 1
        lengths = np.bincount(sentence_of, minlength=len(sentences)).astype(np.int64)
        words = self.word_starts(joined, starts, sentence_of)
        # a sentence of no tokens (none of its characters known) is dropped from its document
        ends = np.cumsum(doc_sentences, dtype=np.int64)
        kept = np.concatenate([[0], np.cumsum(lengths > 0)])
        per_doc = kept[ends] - kept[ends - np.asarray(doc_sentences, dtype=np.int64)]
        return {"ids": ids, "words": words, "sentence_lengths": lengths[lengths > 0], "document_sentences": per_doc}

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, character offset where each token starts) of `text`."""
        if self.char_table is not None and not any(token in text for token in self.added):
            codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            table = self.char_table
            ids = np.where(codepoints < len(table), table[np.minimum(codepoints, len(table) - 1)],
                           self.tokenizer.unk_token_id)
            return ids.astype(np.int64), np.arange(len(text), dtype=np.int64)
        encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        starts = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        return np.asarray(encoding.ids, dtype=np.int64), starts

    def word_starts(self, joined: str, starts: np.ndarray, sentence_of: np.ndarray) -> np.ndarray:
        """1 for each token that begins a word or a sentence, 0 for the rest of a word's tokens."""
        word_lengths = np.fromiter(map(len, self.segment(joined)), dtype=np.int64)
        if word_lengths.sum() != len(joined):
            raise HuayuError("the segmenter's words do not add up to its input text: it must keep every character")
        is_boundary = np.zeros(len(joined) + 1, dtype=np.uint8)
        is_boundary[np.concatenate([[0], np.cumsum(word_lengths)])] = 1
        flags = is_boundary[starts]
        flags[np.flatnonzero(np.diff(sentence_of, prepend=-1))] = 1
        return flags


def char_lookup_table(tokenizer) -> np.ndarray | None:
    """For a character-level tokenizer (huayu's `char` kind: no normalizer, every character its own
    piece, a word-level vocabulary) the ids by code point, so a chunk is encoded by one array
    lookup, ~50x faster than the tokenizer's per-character regex split; None for any other."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") is not None or spec["model"]["type"] != "WordLevel" or pre.get("type") != "Split"
            or pre.get("pattern") != {"Regex": "[\\s\\S]"} or pre.get("behavior") != "Isolated"):
        return None
    singles = {ord(t): i for t, i in spec["model"]["vocab"].items() if len(t) == 1}
    table = np.full(max(singles) + 1 if singles else 1, tokenizer.unk_token_id, dtype=np.int64)
    table[list(singles)] = list(singles.values())
    return table


_ENCODER: ChunkEncoder | None = None


def _init_worker(tokenizer_dir: str, segmenter_name: str) -> None:
    global _ENCODER
    _ENCODER = ChunkEncoder(tokenizer_dir, segmenter_name)


def _encode_chunk(job: tuple[int, list[str]]) -> tuple[int, dict]:
    index, texts = job
    return index, _ENCODER(texts)


# ---------------------------------------------------------------- the store

def store_files(prefix: str | Path) -> dict[str, Path]:
    prefix = str(prefix)
    return {"ids": Path(f"{prefix}_ids.npy"), "idx": Path(f"{prefix}_idx.npz"),
            "words": Path(f"{prefix}_words.npy"), "meta": Path(f"{prefix}_meta.json")}


def is_store(prefix: str | Path) -> bool:
    return store_files(prefix)["meta"].exists()


class TokenStore:
    """A memory-mapped token store: documents of sentences of token ids with word starts."""

    def __init__(self, prefix: str | Path):
        files = store_files(prefix)
        if not files["meta"].exists():
            raise HuayuError(f"'{prefix}' is not a token store (no {files['meta'].name}): build one with "
                             "`huayu data index CORPUS --out PREFIX`")
        self.prefix = str(prefix)
        self.meta = json.loads(files["meta"].read_text(encoding="utf-8"))
        self.ids = np.load(files["ids"], mmap_mode="r")
        self.words = np.load(files["words"], mmap_mode="r")
        idx = np.load(files["idx"])
        self.sentence_offsets, self.document_offsets = idx["sentence_offsets"], idx["document_offsets"]

    @property
    def n_documents(self) -> int:
        return len(self.document_offsets) - 1

    def sentence_ranges(self, document: int) -> np.ndarray:
        """(start, end) token offsets of the sentences of `document`, shape (n, 2)."""
        first, last = self.document_offsets[document], self.document_offsets[document + 1]
        return np.stack([self.sentence_offsets[first:last], self.sentence_offsets[first + 1:last + 1]], axis=1)

    def split(self, ratios: str | None = None, seed: int | None = None) -> list[np.ndarray]:
        """The train, valid and test document indices (the store's recorded split by default)."""
        return split_documents(self.n_documents, ratios or self.meta["split"],
                               self.meta["split_seed"] if seed is None else seed)


def parse_split(ratios: str) -> list[float]:
    try:
        parts = [float(x) for x in ratios.split(",")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise HuayuError(f"--split must be up to three non-negative ratios like 949,50,1, got '{ratios}'")
    return (parts + [0.0, 0.0])[:3]


def split_documents(n_documents: int, ratios: str, seed: int) -> list[np.ndarray]:
    """Documents shuffled with `seed`, cut by the ratios: the same store, ratios and seed always
    give the same split, and no document is in two parts (a sample never crosses documents)."""
    parts = np.asarray(parse_split(ratios))
    order = np.random.default_rng(seed).permutation(n_documents)
    bounds = np.round(np.cumsum(parts) / parts.sum() * n_documents).astype(int)
    return [np.sort(order[lo:hi]) for lo, hi in zip([0, *bounds[:-1]], bounds)]


# ---------------------------------------------------------------- building

def _chunks(texts: list[str], chunk_bytes: int) -> list[list[str]]:
    chunks, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            chunks.append(current)
            current, size = [], 0
    return chunks + ([current] if current else [])


def _save_atomic(path: Path, save) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    save(tmp)
    os.replace(tmp, path)


def build_store(cfg: IndexConfig, texts: list[str], notes: list[str]) -> dict:
    """Encode `texts` into the store at cfg.out, resuming from the part files of an earlier run
    with the same inputs and options; returns the store's metadata."""
    from tqdm.auto import tqdm

    files = store_files(cfg.out)
    options = {k: v for k, v in asdict(cfg).items() if k in ("corpus", "tokenizer", "segmenter", "chunk_mb",
                                                             "text_field", "skip_invalid")}
    options["corpus"] = [str(Path(p).resolve()) for p in cfg.corpus]
    options["tokenizer"] = str(Path(cfg.tokenizer).resolve())
    key = hashlib.sha256(json.dumps([options, len(texts), sum(map(len, texts))]).encode()).hexdigest()[:16]
    parts_dir = Path(f"{cfg.out}.parts-{key}")
    parts_dir.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(texts, max(1, int(cfg.chunk_mb * 2**20)))
    part = [parts_dir / f"part-{i:06d}.npz" for i in range(len(chunks))]
    todo = [i for i in range(len(chunks)) if not part[i].exists()]
    if len(todo) < len(chunks):
        notes.append(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already done in {parts_dir}")
    chunk_bytes = [sum(len(t.encode("utf-8")) for t in c) for c in chunks]
    bar = tqdm(total=sum(chunk_bytes), initial=sum(chunk_bytes) - sum(chunk_bytes[i] for i in todo),
               unit="B", unit_scale=True, desc="index", dynamic_ncols=True)
    jobs = ((i, chunks[i]) for i in todo)
    if cfg.workers <= 1:
        _init_worker(cfg.tokenizer, cfg.segmenter)
        results = map(_encode_chunk, jobs)
        pool = None
    else:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(cfg.workers, _init_worker, (cfg.tokenizer, cfg.segmenter))
        results = pool.imap_unordered(_encode_chunk, jobs)
    try:
        for i, arrays in results:
            _save_atomic(part[i], lambda tmp: np.savez(tmp, **arrays))
            bar.update(chunk_bytes[i])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    meta = _merge(part, files, cfg)
    shutil.rmtree(parts_dir)
    return meta


def _merge(parts: list[Path], files: dict[str, Path], cfg: IndexConfig) -> dict:
    """Concatenate the part files into the store's arrays, written straight to memory-mapped
    files of the final size (never the whole corpus in RAM), each moved into place when complete."""
    from huayu.models.loading import load_tokenizer

    vocab = len(load_tokenizer(cfg.tokenizer))
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    sentence_lengths, document_sentences, n_tokens = [], [], 0
    for p in parts:
        with np.load(p) as z:
            sentence_lengths.append(z["sentence_lengths"])
            document_sentences.append(z["document_sentences"])
            n_tokens += len(z["ids"])
    sentence_lengths, document_sentences = np.concatenate(sentence_lengths), np.concatenate(document_sentences)
    kept = document_sentences > 0  # a document of no tokens is counted as empty, not stored
    sentence_offsets = np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64)
    document_offsets = np.concatenate([[0], np.cumsum(document_sentences[kept])]).astype(np.int64)
    for name, array_dtype in (("ids", dtype), ("words", np.uint8)):
        tmp = files[name].with_name(f".tmp-{files[name].name}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array_dtype, shape=(n_tokens,))
        at = 0
        for p in parts:
            with np.load(p) as z:
                block = z[name]
                out[at:at + len(block)] = block
                at += len(block)
        out.flush()
        del out
        os.replace(tmp, files[name])
    _save_atomic(files["idx"], lambda tmp: np.savez(tmp.open("wb"), sentence_offsets=sentence_offsets,
                                                    document_offsets=document_offsets))
    meta = {"tokenizer": str(Path(cfg.tokenizer).resolve()), "vocab_size": vocab, "dtype": np.dtype(dtype).name,
            "segmenter": cfg.segmenter, "corpus": [str(Path(p).resolve()) for p in cfg.corpus],
            "documents": int(kept.sum()), "empty_documents": int((~kept).sum()),
            "sentences": len(sentence_lengths), "tokens": n_tokens, "split": cfg.split, "split_seed": cfg.split_seed}
    _save_atomic(files["meta"], lambda tmp: tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False),
                                                           encoding="utf-8"))
    return meta


def read_documents(cfg: IndexConfig, notes: list[str]) -> list[str]:
    """The texts of the corpus files (an input->output record's two parts joined by a line break).
    An empty or malformed record is an error naming it, or with --skip-invalid counted in `notes`."""
    from huayu.data.sources import read_text_files

    records = read_text_files(cfg.corpus, cfg.text_field, "tgt_txt", cfg.skip_invalid, report=notes.append)
    return [r.text + (f"\n{r.target}" if r.target else "") for r in records]


def check(cfg: IndexConfig) -> None:
    if not cfg.corpus or not cfg.out:
        raise HuayuError("usage: huayu data index CORPUS... --out PREFIX --tokenizer DIR")
    if not cfg.tokenizer:
        raise HuayuError("--tokenizer DIR is required (train one with `huayu tokenizer train`)")
    if cfg.workers < 1 or cfg.chunk_mb <= 0:
        raise HuayuError("--workers must be at least 1 and --chunk-mb positive")
    parse_split(cfg.split)
    segmenter(cfg.segmenter)
    taken = [str(p) for p in store_files(cfg.out).values() if p.exists()]
    if taken and not (is_store(cfg.out) or cfg.overwrite):
        raise HuayuError(f"--out '{cfg.out}': {', '.join(taken)} exist and are not a huayu token store: choose "
                         "another prefix, or pass --overwrite to replace them")


def add_index_arguments(parser) -> None:
    add_config_arguments(parser, IndexConfig)


def run_index(args) -> int:
    import time

    cfg = config_from_args(IndexConfig, args)
    check(cfg)
    notes: list[str] = []
    t0 = time.perf_counter()
    texts = read_documents(cfg, notes)
    if not texts:
        raise HuayuError(f"{', '.join(cfg.corpus)}: no documents")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    t1 = time.perf_counter()
    meta = build_store(cfg, texts, notes)
    seconds = time.perf_counter() - t1
    for line in notes:
        print(line)
    print(f"read {len(texts):,} documents ({n_bytes / 1e6:,.1f} MB of text) in {t1 - t0:.1f}s; "
          f"indexed in {seconds:.1f}s with {cfg.workers} worker(s): {n_bytes / 1e6 / seconds:.2f} MB/s")
    print(f"{meta['documents']:,} documents, {meta['sentences']:,} sentences, {meta['tokens']:,} tokens; "
          f"{meta['empty_documents']:,} documents without tokens left out")
    store = TokenStore(cfg.out)
    sizes = [len(part) for part in store.split()]
    print(f"split {cfg.split} (seed {cfg.split_seed}): {sizes[0]:,} train / {sizes[1]:,} valid / {sizes[2]:,} test "
          f"documents")
    print(f"wrote {', '.join(str(p) for p in store_files(cfg.out).values())}")
    return 0
