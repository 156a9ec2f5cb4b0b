"""What `huayu rm` and `huayu dpo` share: their data options, the held-out split, pair batches'
log-probabilities and the pairwise loss, and validation in pairs.

Both train in huayu's one loop (huayu/train/loop.py) with their own `loss_fn`, not with trl's
RewardTrainer / DPOTrainer: those are whole transformers Trainers, and huayu's loop already owns
token- (here pair-) weighted accumulation, exact resume, devices, precision, sharding and adapters
for every stage. A batch holds n pairs (huayu.data.preferences.pair_collate): n chosen sequences,
then n rejected ones, and counts n items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from huayu.config import field_doc
from huayu.data.batching import IGNORE, to_device
from huayu.errors import HuayuError
from huayu.train.loop import Evaluation
from huayu.train.stage import StageConfig


@dataclass
class PreferenceConfig(StageConfig):
    data: list[str] = field_doc("preference files: JSON/JSONL records with chosen and rejected (and "
                                "conversations, messages or prompt), or Alpaca records whose output lists "
                                "replies best first (docs/preference.md)", default_factory=list)
    valid_data: list[str] = field_doc("held-out preference files, evaluated every eval_every steps",
                                      default_factory=list)
    val_ratio: float = field_doc("without --valid-data: the share of the pairs held out for validation (drawn "
                                 "with --seed; 0: none)", default=0.1)
    max_source_length: int = field_doc("max tokens of the prompt (its oldest turns are dropped first)", default=256)
    max_target_length: int = field_doc("max tokens of each reply (cut at its end)", default=256)


def check(cfg: PreferenceConfig, command: str) -> None:
    from huayu.models.families import CAUSAL, family_of_model

    family = family_of_model(cfg.model)
    if family.layout != CAUSAL:
        raise HuayuError(f"huayu {command} trains decoder-only models; --model '{cfg.model}' is a {family.name} "
                         "model")
    if not 0 <= cfg.val_ratio < 1:
        raise HuayuError(f"--val-ratio must be in [0, 1), got {cfg.val_ratio}")
    for name in ("max_source_length", "max_target_length"):
        if getattr(cfg, name) < 1:
            raise HuayuError(f"--{name.replace('_', '-')} must be at least 1")


def held_out(pairs: list, ratio: float, seed: int) -> tuple[list, list]:
    """(train, valid): a seeded share `ratio` of the pairs held out, at least one when ratio > 0."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(ratio * len(pairs))) if ratio > 0 else 0
    if n_valid >= len(pairs):
        raise HuayuError(f"--val-ratio {ratio} leaves no training pairs out of {len(pairs)}")
    valid = set(order[:n_valid])
    return [p for i, p in enumerate(pairs) if i not in valid], [pairs[i] for i in sorted(valid)]


def build_pairs(cfg: PreferenceConfig, tokenizer):
    """(train, valid or None) encoded pairs: --valid-data, else --val-ratio of --data held out."""
    from huayu.data.chat import ensure_chat_template
    from huayu.data.preferences import encode_pairs, read_preference_files
    from huayu.models.families import family_of_model

    ensure_chat_template(tokenizer)
    family = family_of_model(cfg.model)
    train = read_preference_files(cfg.data, cfg.skip_invalid)
    if cfg.valid_data:
        valid = read_preference_files(cfg.valid_data, cfg.skip_invalid)
    else:
        train, valid = held_out(train, cfg.val_ratio, cfg.train.seed)
        if valid:
            print(f"validation: {len(valid):,} of the pairs held out (--val-ratio {cfg.val_ratio}, --seed "
                  f"{cfg.train.seed})")

    def encode(pairs, split):
        return encode_pairs(tokenizer, family, pairs, cfg.max_source_length, cfg.max_target_length, split=split)

    return encode(train, "train"), (encode(valid, "valid") if valid else None)


def sequence_logps(model, batch: dict):
    """(sum of the log-probabilities of each sequence's reply tokens, their number), per row."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["reply_labels"][:, 1:]
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE,
                                   reduction="none")
    return token_logps.sum(-1), (labels != IGNORE).sum(-1)


def pairwise_loss(chosen, rejected, offset: float = 0.0):
    """−log σ(chosen − rejected − offset), the mean over pairs: the Bradley–Terry likelihood of the
    preferences under these rewards (reward model, DPO; SimPO asks for a margin `offset`)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected - offset).mean()


def pair_evaluation(loss_fn, examples, collate, batch_size: int, best: str | None = None) -> Evaluation:
    """Validation as the pair-weighted means of `loss_fn`'s loss and parts over `examples`."""
    def run(model) -> dict[str, float]:
        sums, pairs = {}, 0
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[start:start + batch_size]), model.device)
            loss, parts = loss_fn(model, batch)
            n = len(batch["labels"])
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * n
            pairs += n
        return {key: value / pairs for key, value in sums.items()}

    return Evaluation(run, best)
