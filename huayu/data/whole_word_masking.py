"""Masked-LM samples from a token store: whole-word masking and sentence-order prediction (ERNIE 1.0).

A sample is a run of whole sentences of one document, cut to fit `seq_len` (with probability
`short_seq_prob` to a random shorter length, so the model also sees short inputs), stored as three
token offsets: start, where segment B begins, end. Masks are drawn when a batch is built, from
torch's random state (which checkpoints save), so every pass over a sample masks it anew and a
resumed run draws the masks an uninterrupted one would.

Whole-word masking: the words of the segmentation are the units; words are drawn in random order
until `masked_lm_prob` of the sample's tokens are chosen, and every token of a chosen word is
predicted. Each chosen token becomes [MASK] (80%), a random token (10%) or stays itself (10%).
Sentence-order prediction (`sop`): the sample is [CLS] A [SEP] B [SEP] with A and B consecutive
runs of sentences, swapped half the time; label 0 means in order, 1 swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.batching import IGNORE
from huayu.data.blank_infilling import BlankArgs
from huayu.errors import HuayuError


@dataclass
class MaskingArgs:
    masked_lm_prob: float = field_doc("mlm: share of tokens to predict", default=0.15)
    short_seq_prob: float = field_doc("mlm: probability of a sample shorter than seq_len", default=0.1)
    sop: bool = field_doc("mlm: also learn sentence-order prediction (ERNIE's binary_head)", default=False)
    split: str | None = field_doc("mlm: train,valid,test ratios of the token store's documents (default: the "
                                  "store's own)", default=None)


def build_samples(store, documents: np.ndarray, seq_len: int, short_seq_prob: float, sop: bool,
                  seed: int) -> np.ndarray:
    """(start, b_start, end) token offsets of the samples of `documents`; b_start == end without SOP.
    With SOP a sample needs two sentences, so a document of one sentence gives none."""
    rng = np.random.default_rng(seed)
    room = seq_len - (3 if sop else 2)
    samples = []
    for doc in documents:
        ranges = store.sentence_ranges(int(doc))
        if sop and len(ranges) < 2:
            continue
        target = _target(rng, room, short_seq_prob)
        first, size = 0, 0
        for i, (start, end) in enumerate(ranges):
            size += end - start
            last = i == len(ranges) - 1
            if size < target and not last:
                continue
            n = i - first + 1
            if not sop or n >= 2:
                split = ranges[first + rng.integers(1, n), 0] if sop else ranges[i, 1]
                samples.append((ranges[first, 0], split, ranges[i, 1]))
            first, size = i + 1, 0
            target = _target(rng, room, short_seq_prob)
    return np.asarray(samples, dtype=np.int64).reshape(-1, 3)


def _target(rng, room: int, short_seq_prob: float) -> int:
    return int(rng.integers(2, room + 1)) if rng.random() < short_seq_prob else room


class WholeWordMasking:
    """The collate function of masked-LM training: samples -> masked batches."""

    def __init__(self, store, tokenizer, seq_len: int, masked_lm_prob: float = 0.15, sop: bool = False):
        from huayu.data.classification import boundary_ids

        if tokenizer.mask_token_id is None:
            raise HuayuError("the tokenizer has no mask token: train one with `huayu tokenizer train` (which adds "
                             "[MASK]) or use a BERT/ERNIE tokenizer")
        if not 0 < masked_lm_prob < 1:
            raise HuayuError(f"--masked-lm-prob must be between 0 and 1, got {masked_lm_prob}")
        self.store, self.seq_len, self.masked_lm_prob, self.sop = store, seq_len, masked_lm_prob, sop
        self.cls, self.sep = boundary_ids(tokenizer)
        self.mask, self.pad = tokenizer.mask_token_id, tokenizer.pad_token_id
        special = set(tokenizer.all_special_ids)
        self.ordinary = np.asarray([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)

    def segments(self, sample, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids A, word starts A, ids B, word starts B, order label) of one sample, B and A swapped
        half the time, truncated to fit (the longer segment loses a token at a random end)."""
        start, split, end = (int(x) for x in sample)
        a, wa = self.store.ids[start:split].astype(np.int64), self.store.words[start:split].copy()
        b, wb = self.store.ids[split:end].astype(np.int64), self.store.words[split:end].copy()
        swapped = int(self.sop and rng.random() < 0.5)
        if swapped:
            a, wa, b, wb = b, wb, a, wa
        room = self.seq_len - (3 if self.sop else 2)
        while len(a) + len(b) > room:
            longer = 0 if len(a) >= len(b) else 1
            cut = slice(1, None) if rng.random() < 0.5 else slice(None, -1)
            if longer == 0:
                a, wa = a[cut], wa[cut]
            else:
                b, wb = b[cut], wb[cut]
        for words in (wa, wb):  # a segment cut inside a word begins (or ends) with a part of it
            if len(words):
                words[0] = 1
        return a, wa, b, wb, swapped

    def example(self, sample, rng) -> dict:
        """One sample as model inputs: ids with [CLS]/[SEP], segment ids, MLM labels, SOP label."""
        a, wa, b, wb, swapped = self.segments(sample, rng)
        parts = [[self.cls], a, [self.sep]] + ([b, [self.sep]] if self.sop else [])
        ids = np.concatenate(parts).astype(np.int64)
        starts = np.concatenate([[1], wa, [1]] + ([wb, [1]] if self.sop else [])).astype(np.int64)
        candidate = np.ones(len(ids), dtype=bool)
        candidate[0] = candidate[len(a) + 1] = candidate[-1] = False
        segment = np.zeros(len(ids), dtype=np.int64)
        if self.sop:
            segment[len(a) + 2:] = 1
        masked = whole_word_mask(starts, candidate, self.masked_lm_prob, rng)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[masked] = ids[masked]
        draw = rng.random(len(masked))
        inputs = ids.copy()
        inputs[masked[draw < 0.8]] = self.mask
        randomised = masked[draw >= 0.9]
        inputs[randomised] = rng.choice(self.ordinary, size=len(randomised))
        return {"input_ids": inputs, "token_type_ids": segment, "labels": labels, "sop_label": swapped,
                "original": ids}

    def __call__(self, samples) -> dict:
        import torch

        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))  # from torch's saved random state
        examples = [self.example(s, rng) for s in samples]
        width = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": torch.full((len(examples), width), self.pad, dtype=torch.long),
                 "token_type_ids": torch.zeros((len(examples), width), dtype=torch.long),
                 "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
                 "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long)}
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            for key in ("input_ids", "token_type_ids", "labels"):
                batch[key][row, :n] = torch.from_numpy(e[key])
            batch["attention_mask"][row, :n] = 1
        if self.sop:
            batch["next_sentence_label"] = torch.tensor([e["sop_label"] for e in examples])
        return batch


def whole_word_mask(word_starts: np.ndarray, candidate: np.ndarray, prob: float, rng) -> np.ndarray:
    """Sorted positions to predict: whole words, drawn in random order, added while the total
    stays within round(prob * candidate tokens) (at least one word)."""
    positions = np.flatnonzero(candidate)
    if not len(positions):
        return positions
    starts = word_starts[positions].astype(np.int64)
    starts[0] = 1  # the first candidate begins a word, whatever came before it
    word_of = np.cumsum(starts) - 1
    n_words = int(word_of[-1]) + 1
    sizes = np.bincount(word_of, minlength=n_words)
    budget = max(1, int(round(len(positions) * prob)))
    chosen, total = np.zeros(n_words, dtype=bool), 0
    for w in rng.permutation(n_words):
        if total + sizes[w] <= budget:
            chosen[w], total = True, total + sizes[w]
        if total == budget:
            break
    if not chosen.any():  # every word is longer than the budget: mask the shortest whole
        chosen[np.argmin(sizes)] = True
    return positions[chosen[word_of]]


def pretraining_heads(model):
    """(the transformers model under any peft adapter, its BERT pre-training heads or None)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = getattr(core, "cls", None)
    return core, heads if heads is not None and hasattr(heads, "predictions") else None


def mlm_loss(model, batch: dict):
    """(MLM + SOP loss, their parts) with the prediction head applied to the masked positions only
    (ERNIE's gather: a sixth of the head's work). Models without BERT's pre-training heads
    (e.g. a *ForMaskedLM checkpoint) compute their own MLM loss."""
    import torch.nn.functional as F

    labels, order = batch["labels"], batch.get("next_sentence_label")
    core, heads = pretraining_heads(model)
    if heads is None:
        if order is not None:
            raise HuayuError(f"{type(model).__name__} has no sentence-order head: train without --sop")
        inputs = {k: v for k, v in batch.items() if k != "next_sentence_label"}
        loss = model(**inputs).loss
        return loss, {"lm_loss": loss.item()}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    sequence, pooled = core.base_model(**inputs, return_dict=False)[:2]
    where = labels != -100
    lm_loss = F.cross_entropy(heads.predictions(sequence[where]).float(), labels[where])
    if order is None:
        return lm_loss, {"lm_loss": lm_loss.item()}
    sop_loss = F.cross_entropy(heads.seq_relationship(pooled).float(), order)
    return lm_loss + sop_loss, {"lm_loss": lm_loss.item(), "sop_loss": sop_loss.item()}


# ---------------------------------------------------------------- `huayu data show-masked`

@dataclass
class ShowConfig(BlankArgs, MaskingArgs):
    store: str | None = field_doc("token store prefix (from huayu data index)", positional=True, default=None)
    objective: str = field_doc("mlm (ERNIE's whole-word masking) or blank (GLM's blank infilling)", default="mlm")
    tokenizer: str | None = field_doc("tokenizer directory (default: the one the store was built with)",
                                      default=None)
    seq_len: int = field_doc("tokens per sample", default=128)
    samples: int = field_doc("how many samples to show", default=2)
    seed: int = field_doc("seed of the samples and masks shown", default=42)


def add_show_arguments(parser) -> None:
    add_config_arguments(parser, ShowConfig)


def run_show(args) -> int:
    """Print samples as ERNIE's log does: masked, unmasked, then the tokens to predict."""
    from huayu.data.token_store import TokenStore
    from huayu.models.loading import load_tokenizer

    cfg = config_from_args(ShowConfig, args)
    if not cfg.store:
        raise HuayuError("usage: huayu data show-masked PREFIX [--sop] [--seq-len N] [--objective mlm|blank]")
    if cfg.objective not in ("mlm", "blank"):
        raise HuayuError(f"--objective must be mlm or blank, got '{cfg.objective}'")
    store = TokenStore(cfg.store)
    tokenizer = load_tokenizer(cfg.tokenizer or store.meta["tokenizer"])
    if cfg.objective == "blank":
        from huayu.data.blank_infilling import show_samples

        show_samples(store, tokenizer, cfg.seq_len, cfg, cfg.samples, cfg.split, cfg.seed)
        return 0
    masking = WholeWordMasking(store, tokenizer, cfg.seq_len, cfg.masked_lm_prob, cfg.sop)
    samples = build_samples(store, store.split(cfg.split)[0], cfg.seq_len, cfg.short_seq_prob, cfg.sop, cfg.seed)
    if not len(samples):
        raise HuayuError(f"'{cfg.store}' gives no samples (with --sop a document needs two sentences)")
    rng = np.random.default_rng(cfg.seed)
    for k, i in enumerate(rng.choice(len(samples), size=min(cfg.samples, len(samples)), replace=False)):
        e = masking.example(samples[i], rng)
        masked = np.flatnonzero(e["labels"] != IGNORE)
        print(f"sample {k + 1} (#{i}, {len(e['input_ids'])} tokens, {len(masked)} to predict"
              + (f", sentence order {'swapped' if e['sop_label'] else 'kept'}" if cfg.sop else "") + ")")
        print("masked:   " + " ".join(tokenizer.convert_ids_to_tokens(e["input_ids"].tolist())))
        print("original: " + " ".join(tokenizer.convert_ids_to_tokens(e["original"].tolist())))
        print(f"labels:   {tokenizer.convert_ids_to_tokens(e['labels'][masked].tolist())}\n")
    return 0
