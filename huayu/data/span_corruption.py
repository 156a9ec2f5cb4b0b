"""T5 span corruption: encoder-decoder pre-training examples from a packed token stream.

Random spans (15% of the tokens, 3 tokens long on average) are cut out of each chunk; the encoder
input keeps the rest with one sentinel per cut span, and the decoder target lists each sentinel
followed by the tokens it replaced (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning", section 3.1.4). Example with sentinels X, Y:

    original  a b c d e f g      inputs   a X d e Y g </s>
    noise       ^ ^     ^        targets  X b c Y f </s>

Both sequences end with </s>, as in T5. Sentinels are looked up by their T5/mT5 names
(<extra_id_0>, <extra_id_1>, ...), so a downloaded mT5 tokenizer works as well as one trained by
`huayu tokenizer train --sentinels 100`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from huayu.config import ConfigError
from huayu.data.batching import Example
from huayu.errors import HuayuError


def sentinel_tokens(n: int) -> list[str]:
    """The names of the first `n` sentinels, in the order spans use them."""
    return [f"<extra_id_{i}>" for i in range(n)]


def sentinel_ids(tokenizer, n: int) -> list[int]:
    """Ids of <extra_id_0> ... <extra_id_{n-1}>; a HuayuError if the tokenizer lacks any of them."""
    tokens = sentinel_tokens(n)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise HuayuError(f"span corruption needs {n} sentinel tokens but the tokenizer has no {missing[0]}; "
                         f"train one with `huayu tokenizer train --sentinels {max(n, 100)}`")
    return ids


def _check(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise ConfigError(f"noise density must be between 0 and 1, got {noise_density}")
    if mean_noise_span_length < 1:
        raise ConfigError(f"mean noise span length must be at least 1, got {mean_noise_span_length}")


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for `length` tokens, as T5 counts them.

    At least one token is hidden and one kept. The span count is also capped at the number of kept
    tokens (T5 does not cap it) because consecutive spans need a kept token between them; only a
    noise density above mean/(mean + 1) reaches the cap.
    """
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_noise_span_length), 1)
    return noise, min(spans, length - noise)


def _random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split `items` into `segments` positive lengths, each split equally likely."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False)) + 1
    return np.diff(cuts, prepend=0, append=items)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            *, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over `length` tokens (True = noise): kept and noise spans alternate.

    T5's algorithm: the noise and the kept tokens are each split at random into the same number of
    spans, and the spans interleave starting with kept tokens, so the first token is never noise and
    the last always is. `rng` is required so every mask is reproducible from a seed.
    """
    _check(noise_density, mean_noise_span_length)
    if length < 2:
        raise ValueError(f"a noise mask needs at least 2 tokens (one hidden, one kept), got {length}")
    noise, spans = _span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(length - noise, spans, rng)
    runs = np.stack([kept_lengths, noise_lengths], axis=1).ravel()
    return np.repeat(np.tile([False, True], spans), runs)


def corrupt(ids: Sequence[int], mask: Sequence[bool], sentinels: Sequence[int],
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): each run of noise in `ids` becomes the next sentinel in the inputs, and
    the targets are each sentinel followed by the run it replaced; both end with `eos_id`."""
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    if ids.shape != mask.shape:
        raise ValueError(f"{len(ids)} ids but a mask of {len(mask)}")
    starts = mask.copy()
    starts[1:] &= ~mask[:-1]
    spans = int(starts.sum())
    if spans > len(sentinels):
        raise HuayuError(f"{spans} noise spans but only {len(sentinels)} sentinels")
    marks = np.asarray(sentinels, dtype=np.int64)[:spans]
    inputs = ids.copy()
    inputs[starts] = marks
    inputs = inputs[~mask | starts]
    targets = np.insert(ids[mask], np.cumsum(mask)[starts] - 1, marks)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def _corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths after corrupting `length` tokens, eos included."""
    noise, spans = _span_counts(length, noise_density, mean_noise_span_length)
    return length - noise + spans + 1, noise + spans + 1


def compute_lengths(input_length: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per chunk, target length): the longest chunk whose corrupted input, eos
    included, is exactly `input_length` tokens, as T5's compute_input_and_target_lengths.

    The corrupted length grows by at most one per extra raw token except when the span cap of
    `_span_counts` binds, so the search is exact for any sensible density; otherwise it says so.
    """
    _check(noise_density, mean_noise_span_length)
    raw = 2
    if _corrupted_lengths(raw, noise_density, mean_noise_span_length)[0] > input_length:
        raise ConfigError(f"input length {input_length} is too short for span corruption (minimum 3)")
    while _corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= input_length:
        raw += 1
    inputs, targets = _corrupted_lengths(raw, noise_density, mean_noise_span_length)
    if inputs != input_length:
        raise ConfigError(f"no chunk length corrupts to exactly {input_length} tokens with noise density "
                          f"{noise_density} and mean span {mean_noise_span_length}")
    return raw, targets


def _token_stream(source: Iterable[int] | Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """A flat id stream as is, or documents (without eos) each followed by `eos_id`."""
    items = source if isinstance(source, np.ndarray) else list(source)
    if len(items) == 0 or isinstance(items[0], (int, np.integer)):
        return np.asarray(items, dtype=np.int64)
    return np.concatenate([np.append(np.asarray(doc, dtype=np.int64), eos_id) for doc in items])


def span_corruption_examples(source: Iterable[int] | Iterable[Sequence[int]], tokenizer, input_length: int,
                             noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                             seed: int = 0) -> list[Example]:
    """Pack `source` (a flat id stream, or documents joined with eos) into chunks and corrupt each.

    Every full chunk gives inputs of exactly `input_length` tokens and targets of the length
    compute_lengths reports; `labels` are the decoder targets, so they are shorter than
    `input_ids`. A shorter last chunk is corrupted at its own length (so no text is lost; the
    collator pads it), except a single leftover token, which has nothing to hide and is dropped.
    The tokenizer supplies eos and as many sentinels as a full chunk has spans.
    """
    raw, _ = compute_lengths(input_length, noise_density, mean_noise_span_length)
    sentinels = sentinel_ids(tokenizer, _span_counts(raw, noise_density, mean_noise_span_length)[1])
    eos_id = tokenizer.eos_token_id
    stream = _token_stream(source, eos_id)
    rng = np.random.default_rng(seed)
    examples = []
    for start in range(0, len(stream) - 1, raw):  # every chunk has at least 2 tokens
        chunk = stream[start:start + raw]
        mask = random_spans_noise_mask(len(chunk), noise_density, mean_noise_span_length, rng=rng)
        inputs, targets = corrupt(chunk, mask, sentinels, eos_id)
        examples.append(Example(input_ids=inputs, labels=targets))
    return examples
