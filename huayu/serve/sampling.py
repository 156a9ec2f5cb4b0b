"""Next-token choice for a batch whose rows each have their own sampling parameters.

One step treats every row at once (penalties, temperature, top-k, top-p as tensor operations);
only the final draw loops over rows, so that a row with a seed draws from its own generator and
gives the same tokens whichever other requests share its batch. Everything stays on the logits'
device (a row's generator too); only the chosen ids come back to the CPU, once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# below it, sampling is greedy in all but name, and logits / temperature could overflow float32
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0            # 0 (or below MIN_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 (or the vocabulary size or more): off
    repetition_penalty: float = 1.0     # transformers' definition, over prompt and output
    frequency_penalty: float = 0.0      # OpenAI's definitions, over the output
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def _column(values, device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition penalty over each row's prompt + output, frequency and presence over its output."""
    if not any(p.penalised for p in params):
        return logits
    (rows, vocab), device = logits.shape, logits.device
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(rows, vocab, device=device)
    for i, (history, out) in enumerate(zip(histories, outputs)):
        seen[i, torch.tensor(history, dtype=torch.long, device=device)] = True
        if out:
            counts[i].index_add_(0, torch.tensor(out, device=device), torch.ones(len(out), device=device))
    rep = _column([p.repetition_penalty for p in params], device)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - counts * _column([p.frequency_penalty for p in params], device)
    return logits - (counts > 0) * _column([p.presence_penalty for p in params], device)


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted logits with the tokens outside each row's top-k / top-p set to -inf, their ids)."""
    ordered, ids = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs               # mass of the tokens ranked above each one
    drop = before > _column([p.top_p for p in params], logits.device)
    vocab = logits.shape[-1]
    k = _column([min(p.top_k, vocab) or vocab for p in params], logits.device, torch.long)
    drop |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= k
    return ordered.masked_fill(drop, float("-inf")), ids


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  histories: list[list[int]], outputs: list[list[int]], banned: list[int]) -> list[int]:
    """One token per row of `logits` (rows × vocab). `banned` ids (eos for ignore_eos rows) are
    excluded for the rows that ask for it."""
    device = logits.device
    logits = apply_penalties(logits.float(), params, histories, outputs)
    if banned and any(p.ignore_eos for p in params):
        rows = [i for i, p in enumerate(params) if p.ignore_eos]
        logits[torch.tensor(rows, device=device).unsqueeze(1), torch.tensor(banned, device=device)] = float("-inf")
    chosen = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        sub = [params[i] for i in sampled]
        scaled = logits[sampled] / _column([p.temperature for p in sub], device)
        ordered, ids = _filter_top_k_top_p(scaled, sub)
        probs = ordered.softmax(-1)
        if not torch.isfinite(probs).all():  # raised before any row draws: retried alone, a seeded row draws once
            raise ValueError("these sampling parameters make the probabilities inf or nan")
        picks = torch.cat([torch.multinomial(probs[row], 1, generator=generators[i]) for row, i in enumerate(sampled)])
        chosen[torch.tensor(sampled, device=device)] = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
    return chosen.tolist()
