"""GLM's autoregressive blank infilling: pre-training samples from a token store.

A sample is a run of whole sentences of one document (huayu/data/whole_word_masking.py's
`build_samples`, cut to leave room for the spans' extra tokens). When a batch is built, each sample
draws one of three objectives (Du et al. 2022, sections 2.2 and 2.3):

- token level, [MASK]: span lengths drawn from Poisson(λ=3) (zeros redrawn) until `blank_ratio`
  of the tokens are covered, placed at random without touching each other;
- sentence level, [sMASK] (`sentence_ratio` of the samples): whole sentences, in random order,
  until they cover `blank_ratio` of the tokens (short samples of long sentences cover more: a
  sentence is never cut);
- document level, [gMASK] (`document_ratio` of the samples): one span of 50–100 % of the text,
  at its end, so that the model learns to continue a text.

Part A is the text with every span replaced by its mask token; Part B holds the spans in random
order, each as `<sop> span` with targets `span <eop>` (huayu/models/glm.py). A sample of n text
tokens and k spans becomes n + 2k tokens. Everything per span is numpy array arithmetic; the masks
come from torch's random state (which checkpoints save), so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from huayu.config import field_doc
from huayu.data.batching import IGNORE
from huayu.errors import HuayuError

TOKEN, SENTENCE, DOCUMENT = "token", "sentence", "document"


@dataclass
class BlankArgs:
    blank_ratio: float = field_doc("blank: share of tokens in [MASK] spans (token level) or [sMASK] sentences",
                                   default=0.15)
    poisson_lambda: float = field_doc("blank: mean of the Poisson distribution of [MASK] span lengths", default=3.0)
    sentence_ratio: float = field_doc("blank: share of samples with the sentence-level objective ([sMASK])",
                                      default=0.2)
    document_ratio: float = field_doc("blank: share of samples with the document-level objective ([gMASK], one "
                                      "span of half to all of the text, at its end)", default=0.3)


def text_budget(seq_len: int, blank_ratio: float) -> int:
    """Text tokens per sample such that text + 2 tokens per span usually fits `seq_len` (spans of
    one token at the blank ratio); samples that still do not fit lose their last spans."""
    return max(2, int(seq_len / (1 + 2 * blank_ratio)))


@dataclass
class Blanks:
    """One sample's spans: (start, end) token offsets, sorted, and the objective that drew them."""
    spans: np.ndarray
    objective: str


class BlankInfilling:
    """The collate function of blank-infilling pre-training: samples -> GLM batches."""

    def __init__(self, store, tokenizer, seq_len: int, args: BlankArgs):
        from huayu.data.templates import EOP, GMASK, MASK, SMASK, SOP

        ids = dict(zip((MASK, SMASK, GMASK, SOP, EOP), tokenizer.convert_tokens_to_ids([MASK, SMASK, GMASK, SOP, EOP])))
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise HuayuError(f"the tokenizer lacks GLM's {', '.join(missing)}: load it through huayu, which adds them")
        if not 0 < args.blank_ratio < 1:
            raise HuayuError(f"--blank-ratio must be between 0 and 1, got {args.blank_ratio}")
        if args.poisson_lambda <= 0:
            raise HuayuError(f"--poisson-lambda must be positive, got {args.poisson_lambda}")
        if min(args.sentence_ratio, args.document_ratio) < 0 or args.sentence_ratio + args.document_ratio > 1:
            raise HuayuError("--sentence-ratio and --document-ratio must be shares of the samples that add up to "
                             f"at most 1, got {args.sentence_ratio} and {args.document_ratio}")
        self.store, self.seq_len, self.args = store, seq_len, args
        self.budget = text_budget(seq_len, args.blank_ratio)
        self.mask_of = {TOKEN: ids[MASK], SENTENCE: ids[SMASK], DOCUMENT: ids[GMASK]}
        self.sop, self.eop, self.pad = ids[SOP], ids[EOP], tokenizer.pad_token_id

    # -- which tokens to blank -----------------------------------------------------------------
    def token_spans(self, n: int, rng) -> np.ndarray:
        """Poisson(λ) lengths until blank_ratio of `n` tokens are covered, placed at random with
        at least one kept token between spans."""
        target = max(1, round(self.args.blank_ratio * n))
        lengths = rng.poisson(self.args.poisson_lambda, size=target + 8)
        lengths = lengths[lengths > 0]
        while lengths.sum() < target:   # rare: too many zeros were drawn
            lengths = np.append(lengths, max(1, rng.poisson(self.args.poisson_lambda)))
        lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), target)) + 1]
        while len(lengths) > 1 and lengths.sum() + len(lengths) - 1 > n - 1:   # keep at least one token
            lengths = lengths[:-1]
        lengths[0] = min(lengths[0], n - 1)
        k = len(lengths)
        spare = n - lengths.sum() - (k - 1)
        cuts = np.sort(rng.choice(spare + k, k, replace=False))
        gaps = np.diff(cuts, prepend=-1) - 1          # kept tokens before each span beyond the minimum
        gaps[1:] += 1
        starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return np.stack([starts, starts + lengths], axis=1)

    def sentence_spans(self, sentences: np.ndarray, n: int, rng) -> np.ndarray | None:
        """Whole sentences in random order until blank_ratio of `n` is covered, passing over those
        that would take the cover beyond twice that (or beyond the shortest sentence, when even it
        is longer) or that are over half the text; None when no sentence qualifies."""
        target = self.args.blank_ratio * n
        sizes = sentences[:, 1] - sentences[:, 0]
        limit = max(2 * target, sizes.min())
        chosen, covered = [], 0
        for i in rng.permutation(len(sentences)):
            if covered + sizes[i] > limit or sizes[i] > n / 2:
                continue
            chosen.append(i)
            covered += sizes[i]
            if covered >= target:
                break
        return sentences[np.sort(chosen)] if chosen else None

    def blanks(self, n: int, sentences: np.ndarray, rng) -> Blanks:
        r = rng.random()
        if r < self.args.document_ratio:
            length = int(rng.integers(int(np.ceil(n / 2)), n + 1))
            return Blanks(np.array([[n - length, n]]), DOCUMENT)
        if r < self.args.document_ratio + self.args.sentence_ratio:
            spans = self.sentence_spans(sentences, n, rng)
            if spans is not None:
                return Blanks(spans, SENTENCE)
        return Blanks(self.token_spans(n, rng), TOKEN)

    # -- building the sequence -------------------------------------------------------------------
    def sample_tokens(self, sample) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, sentence (start, end) offsets within them) of one sample, cut to the budget."""
        start, _, end = (int(x) for x in sample)
        end = min(end, start + self.budget)
        offsets = self.store.sentence_offsets
        inner = offsets[(offsets > start) & (offsets < end)] - start
        bounds = np.concatenate([[0], inner, [end - start]]).astype(np.int64)
        return self.store.ids[start:end].astype(np.int64), np.stack([bounds[:-1], bounds[1:]], axis=1)

    def fit(self, n: int, spans: np.ndarray) -> np.ndarray:
        """Drop the last spans while text + 2 tokens per span exceeds seq_len."""
        keep = len(spans)
        while keep > 1 and n + 2 * keep > self.seq_len:
            keep -= 1
        return spans[:keep]

    def example(self, tokens: np.ndarray, blanks: Blanks, rng) -> dict[str, np.ndarray]:
        """input ids, labels and 2D position ids of `tokens` with `blanks` (Part B shuffled)."""
        n, spans = len(tokens), self.fit(len(tokens), blanks.spans)
        starts, ends = spans[:, 0], spans[:, 1]
        blanked = np.zeros(n, dtype=bool)
        for s, e in spans:          # a handful of spans per sample
            blanked[s:e] = True
        first = np.zeros(n, dtype=bool)
        first[starts] = True
        ids_a = np.where(first, self.mask_of[blanks.objective], tokens)[~blanked | first]
        mask_at = np.cumsum(~blanked | first)[starts] - 1      # each span's mask position in Part A

        order = rng.permutation(len(spans))
        lengths = (ends - starts)[order]
        begin = np.repeat(np.cumsum(lengths + 1) - (lengths + 1), lengths + 1)
        offset = np.arange(int((lengths + 1).sum())) - begin     # 0 at <sop>, then 1..length
        source = np.repeat(starts[order], lengths + 1) + offset   # tokens[source - 1] is the input
        length = np.repeat(lengths, lengths + 1)
        ids_b = np.where(offset == 0, self.sop, tokens[np.clip(source - 1, 0, n - 1)])
        labels_b = np.where(offset < length, tokens[np.clip(source, 0, n - 1)], self.eop)
        na = len(ids_a)
        return {"input_ids": np.concatenate([ids_a, ids_b]),
                "labels": np.concatenate([np.full(na, IGNORE), labels_b]),
                "position_ids": np.stack([np.concatenate([np.arange(na), np.repeat(mask_at[order], lengths + 1)]),
                                          np.concatenate([np.zeros(na, dtype=np.int64), offset + 1])])}

    def __call__(self, samples) -> dict:
        import torch

        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))  # from torch's saved random state
        examples = []
        for sample in samples:
            tokens, sentences = self.sample_tokens(sample)
            examples.append(self.example(tokens, self.blanks(len(tokens), sentences, rng), rng))
        return collate_blank(examples, self.pad)


def collate_blank(examples: list[dict], pad_id: int) -> dict:
    """Right-padded GLM batches: input_ids, attention_mask, labels and (batch, 2, length) positions."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
             "position_ids": torch.zeros((len(examples), 2, width), dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.from_numpy(e["input_ids"])
        batch["labels"][row, :n] = torch.from_numpy(e["labels"])
        batch["position_ids"][row, :, :n] = torch.from_numpy(e["position_ids"])
        batch["attention_mask"][row, :n] = 1
    return batch


def show_samples(store, tokenizer, seq_len: int, args: BlankArgs, count: int, split: str | None, seed: int) -> None:
    """Print samples as `huayu data show-masked --objective blank` shows them: the objective, the
    original text, Part A, and Part B with each span's targets."""
    from huayu.data.whole_word_masking import build_samples
    from huayu.models.families import GLM

    GLM.add_special_tokens(tokenizer)
    collate = BlankInfilling(store, tokenizer, seq_len, args)
    samples = build_samples(store, store.split(split)[0], collate.budget + 2, 0.0, False, seed)
    if not len(samples):
        raise HuayuError(f"'{store.prefix}' gives no samples")
    rng = np.random.default_rng(seed)
    for k, i in enumerate(rng.choice(len(samples), size=min(count, len(samples)), replace=False)):
        tokens, sentences = collate.sample_tokens(samples[i])
        blanks = collate.blanks(len(tokens), sentences, rng)
        e = collate.example(tokens, blanks, rng)
        part_a = int((e["labels"] == IGNORE).sum())

        def show(ids):
            return " ".join(tokenizer.convert_ids_to_tokens(ids.tolist()))

        print(f"sample {k + 1} (#{i}, {blanks.objective} level: {len(blanks.spans)} span(s) of {len(tokens)} tokens "
              f"-> {len(e['input_ids'])} tokens)")
        print("original: " + show(tokens))
        print("part A:   " + show(e["input_ids"][:part_a]))
        print("part B:   " + show(e["input_ids"][part_a:]))
        print("targets:  " + show(e["labels"][part_a:]) + "\n")
