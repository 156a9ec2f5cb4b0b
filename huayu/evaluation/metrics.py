"""Two published conventions for scoring Chinese generations; every score is a percentage.

EVA's (KdConv, `dialogue_metrics`): BLEU-4, Dist-n, F1, ROUGE-L, all on characters, since Chinese
has no word boundaries. By default whitespace is dropped first, so a stray space or newline in
generated text neither earns nor costs points. `eva_compat=True` reproduces EVA's
`src/generation_metrics.py` (thu-coai/EVA) where it differs from the clean definition.

ChatGLM-6B's (ADGEN, `adgen_metrics`): per-sample sentence BLEU-4 on characters and ROUGE-1/2/L
on jieba words, averaged over samples, as its p-tuning script computes them. The two give
different numbers for the same text, so reports always say which is which (`CONVENTIONS`).
docs/metrics.md lists every difference.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

# EVA's calc_rouge_l defaults to beta=1.2, which weights recall above precision.
EVA_ROUGE_BETA = 1.2

# ChatGLM's score names, in the order its compute_metrics fills them.
ADGEN_ROUGE = ("rouge-1", "rouge-2", "rouge-l")

# One line per convention, written beside the scores so a report says which numbers are which.
CONVENTIONS = {
    "eva": "EVA (thu-coai/EVA): characters, whitespace removed; corpus BLEU-4 (NLTK, method3); "
           "Dist-n pooled over responses; F1 and ROUGE-L (LCS, beta 1) averaged over samples",
    "adgen": "ChatGLM-6B ptuning (ADGEN): sentence BLEU-4 on characters (NLTK, method3) and "
             "ROUGE-1/2/L F on jieba words (rouge_chinese), each averaged over samples",
}


def char_tokens(text: str) -> list[str]:
    """Split `text` into its characters, dropping whitespace (spaces, tabs, newlines, U+3000)."""
    return [ch for ch in text if not ch.isspace()]


def bleu4(hyps: list[str], refs: list[str], eva_compat: bool = False) -> float:
    """Corpus BLEU-4 (NLTK, uniform weights, smoothing method3, one reference per hypothesis).

    Corpus-level, not a mean of sentence scores: n-gram matches and lengths are summed over all
    samples first, which is what EVA reports.
    """
    _check_pairs(hyps, refs)
    hyp_tokens = [_tokens(hyp, eva_compat) for hyp in hyps]
    ref_tokens = [[_tokens(ref, eva_compat)] for ref in refs]
    score = corpus_bleu(ref_tokens, hyp_tokens, weights=(0.25, 0.25, 0.25, 0.25),
                        smoothing_function=SmoothingFunction().method3)
    return 100 * float(score)


def distinct(hyps: list[str], n: int, eva_compat: bool = False) -> float:
    """Dist-n: unique character n-grams / all character n-grams, pooled over every response.

    0 when the responses hold no n-gram at all (e.g. all shorter than n), as in EVA.
    """
    if not hyps:
        raise ValueError("distinct: no hypotheses to score")
    if n < 1:
        raise ValueError(f"distinct: n must be at least 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for hyp in hyps:
        tokens = _tokens(hyp, eva_compat)
        if eva_compat:
            # EVA loops over range(len(sen) - k): one start short, so each response's final
            # n-gram -- the only one using its last character -- is never counted.
            tokens = tokens[:-1]
        grams = list(_ngrams(tokens, n))
        total += len(grams)
        seen.update(grams)
    return 100 * len(seen) / total if total else 0.0


def unigram_f1(hyps: list[str], refs: list[str], eva_compat: bool = False) -> float:
    """Mean per-sample character F1, counting overlap as a multiset (Counter intersection).

    A repeated character matches only as often as the reference holds it: "哈哈哈" vs "哈哈"
    overlaps in 2 characters, not 1 (sets) or 3 (plain counts).
    """
    _check_pairs(hyps, refs)
    scores = []
    for hyp, ref in zip(hyps, refs):
        hyp_tokens, ref_tokens = _tokens(hyp, eva_compat), _tokens(ref, eva_compat)
        overlap = (Counter(hyp_tokens) & Counter(ref_tokens)).total()
        scores.append(_f_measure(overlap, len(hyp_tokens), len(ref_tokens), 1.0, eva_compat))
    return _mean_percent(scores)


def rouge_l(hyps: list[str], refs: list[str], eva_compat: bool = False) -> float:
    """Mean per-sample ROUGE-L: F-measure of LCS precision and recall (beta 1; EVA's 1.2)."""
    _check_pairs(hyps, refs)
    beta = EVA_ROUGE_BETA if eva_compat else 1.0
    scores = []
    for hyp, ref in zip(hyps, refs):
        hyp_tokens, ref_tokens = _tokens(hyp, eva_compat), _tokens(ref, eva_compat)
        lcs = _lcs_length(hyp_tokens, ref_tokens)
        scores.append(_f_measure(lcs, len(hyp_tokens), len(ref_tokens), beta, eva_compat))
    return _mean_percent(scores)


def dialogue_metrics(hyps: list[str], refs: list[str], eva_compat: bool = False) -> dict[str, float]:
    """All metrics of EVA's static evaluation, rounded to 4 decimals, keyed for JSON reports."""
    _check_pairs(hyps, refs)
    scores = {
        "bleu4": bleu4(hyps, refs, eva_compat),
        **{f"dist{n}": distinct(hyps, n, eva_compat) for n in range(1, 5)},
        "f1": unigram_f1(hyps, refs, eva_compat),
        "rouge_l": rouge_l(hyps, refs, eva_compat),
    }
    return {name: round(value, 4) for name, value in scores.items()}


def adgen_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """ChatGLM-6B's ADGEN scores (ptuning/main.py, `compute_metrics`), keyed by its names.

    Each sample is scored alone and rounded to 4 decimals, as ChatGLM does, then every metric
    is averaged over samples; the means are rounded to 4 decimals for the report.
    """
    import jieba

    _check_pairs(hyps, refs)
    jieba.setLogLevel(logging.WARNING)  # not "Building prefix dict ..." on stderr at first use
    samples = [_adgen_sample(hyp, ref) for hyp, ref in zip(hyps, refs)]
    return {name: round(sum(s[name] for s in samples) / len(samples), 4) for name in samples[0]}


def _adgen_sample(hyp: str, ref: str) -> dict[str, float]:
    """ROUGE on jieba words, BLEU-4 on raw characters (whitespace kept), as ChatGLM computes them.

    NLTK's `sentence_bleu` scores a sample with no match (or an empty side) 0, so only ROUGE
    needs a guard: rouge_chinese raises "Hypothesis is empty." where ChatGLM's script would crash,
    and huayu scores that sample 0 instead, like LLaMA-Factory's port of the same code.
    """
    import jieba
    from rouge_chinese import Rouge

    hyp_words, ref_words = " ".join(jieba.cut(hyp)), " ".join(jieba.cut(ref))
    if hyp_words.split() and ref_words.split():
        scores = Rouge().get_scores(hyp_words, ref_words)[0]
        rouge = {name: round(100 * scores[name]["f"], 4) for name in ADGEN_ROUGE}
    else:
        rouge = dict.fromkeys(ADGEN_ROUGE, 0.0)
    bleu = sentence_bleu([list(ref)], list(hyp), smoothing_function=SmoothingFunction().method3)
    return {**rouge, "bleu-4": round(100 * float(bleu), 4)}


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of `a` and `b`.

    Bit-parallel (Allison-Dix/Hyyro): bit i of `row` is 0 where the LCS grows at a[i], so one
    pass over `b` with big-int arithmetic replaces the O(len(a)*len(b)) table -- fast enough
    for 10k samples in pure Python.
    """
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | 1 << i
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matched = row & positions.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(a) - row.bit_count()


def _tokens(text: str, eva_compat: bool) -> list[str]:
    """EVA feeds decoded strings straight to its metrics, so it keeps whitespace as characters."""
    return list(text) if eva_compat else char_tokens(text)


def _ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)))


def _f_measure(match: int, hyp_len: int, ref_len: int, beta: float, eva_compat: bool) -> float:
    """F_beta of precision match/hyp_len and recall match/ref_len, as a fraction.

    Two empty texts agree perfectly (1.0); EVA divides by the reference length and crashes
    there, so eva_compat scores them 0 like any other pair without a match.
    """
    if hyp_len == ref_len == 0:
        return 0.0 if eva_compat else 1.0
    if match == 0:
        return 0.0
    precision, recall = match / hyp_len, match / ref_len
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def _mean_percent(scores: list[float]) -> float:
    return 100 * sum(scores) / len(scores)


def _check_pairs(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"need one reference per hypothesis: got {len(hyps)} hypotheses "
                         f"and {len(refs)} references")
    if not hyps:
        raise ValueError("no hypothesis/reference pairs to score")
