"""`huayu dpo`: direct preference optimisation of an SFT model on preference pairs, or SimPO.

DPO (Rafailov et al. 2023) trains the policy π on −log σ(β·[(log π(y_c) − log π_ref(y_c)) −
(log π(y_r) − log π_ref(y_r))]), the log-probabilities summed over each reply's tokens. The
reference π_ref is the starting model, frozen: with full or freeze fine-tuning a second copy loaded
from --model (so a resumed run compares with the start, not with its checkpoint); with LoRA the
policy itself with its adapter switched off (`disable_adapter()`), so the base is held once. Its
log-probabilities are computed per batch under no_grad: one more forward, no pass over the data
before training and nothing to keep in step with resume.

SimPO (Meng et al. 2024, `--loss simpo`) needs no reference: the reward is β times the reply's
mean token log-probability (length-normalised), and the chosen reward must beat the rejected one by
a margin γ: −log σ(β·avg log π(y_c) − β·avg log π(y_r) − γ).

The loss parts are logged under trl's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins), for training and, on held-out pairs, validation.
"""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.errors import HuayuError
from huayu.train import preference
from huayu.train.stage import StageData, run_stage

DEFAULT_BETA = {"sigmoid": 0.1, "simpo": 2.0}
LOSSES = tuple(DEFAULT_BETA)


@dataclass
class DpoConfig(preference.PreferenceConfig):
    model: str = field_doc("the SFT model to optimise (a model directory); also the reference", default=None)
    out: str = field_doc("output directory", default="out/dpo")
    loss: str = field_doc(f"{' | '.join(LOSSES)}: DPO's loss against the frozen reference, or SimPO's "
                          "length-normalised one without a reference", default="sigmoid")
    beta: float | None = field_doc("the rewards' scale β (default: 0.1 for sigmoid, 2.0 for simpo)", default=None)
    gamma: float = field_doc("simpo: the margin γ the chosen reward must win by", default=0.5)


def reward_parts(chosen, rejected) -> dict[str, float]:
    """trl's logged reward statistics of a batch of pairs."""
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item()}


class FrozenCopy:
    """The reference as a second model: the starting weights, each in the dtype of the policy's
    (so that at step 0 the two compute alike), frozen, moved to the batches' device when used."""

    def __init__(self, model, policy):
        for ref, trained in zip(model.parameters(), policy.parameters()):
            ref.data = ref.data.to(trained.dtype)
        self.model = model.eval().requires_grad_(False)

    def __call__(self, policy, batch: dict):
        import torch

        self.model.to(batch["input_ids"].device)
        with torch.no_grad():
            return preference.sequence_logps(self.model, batch)[0]


def adapter_disabled(policy, batch: dict):
    """The reference as the policy with its adapter off: the base it started from, held once."""
    import torch

    with torch.no_grad(), policy.disable_adapter():
        return preference.sequence_logps(policy, batch)[0]


class DpoLoss:
    """DPO's sigmoid loss; its reference is set once the policy exists (StageData.check_model)."""

    def __init__(self, cfg: DpoConfig, tokenizer):
        self.cfg, self.tokenizer, self.beta, self.reference = cfg, tokenizer, beta(cfg), None

    def attach(self, policy) -> None:
        from peft import PeftModel

        from huayu.models.loading import load_model

        if isinstance(policy, PeftModel):
            self.reference = adapter_disabled
        else:
            start = load_model(self.cfg.model, self.tokenizer, seed=self.cfg.train.seed, loading=self.cfg.loading)
            self.reference = FrozenCopy(start, policy)

    def __call__(self, model, batch: dict):
        logps = preference.sequence_logps(model, batch)[0]
        chosen, rejected = (self.beta * (logps - self.reference(model, batch))).chunk(2)
        return preference.pairwise_loss(chosen, rejected), reward_parts(chosen, rejected)


class SimpoLoss:
    """SimPO's loss: rewards from the replies' mean token log-probabilities, no reference."""

    def __init__(self, cfg: DpoConfig):
        self.beta, self.gamma = beta(cfg), cfg.gamma

    def __call__(self, model, batch: dict):
        logps, lengths = preference.sequence_logps(model, batch)
        chosen, rejected = (self.beta * logps / lengths).chunk(2)
        return preference.pairwise_loss(chosen, rejected, self.gamma), reward_parts(chosen, rejected)


def beta(cfg: DpoConfig) -> float:
    return DEFAULT_BETA[cfg.loss] if cfg.beta is None else cfg.beta


def stage_data(cfg: DpoConfig, tokenizer) -> StageData:
    from huayu.data.preferences import pair_collate

    train, valid = preference.build_pairs(cfg, tokenizer)
    collate = pair_collate(tokenizer.pad_token_id)
    loss = DpoLoss(cfg, tokenizer) if cfg.loss == "sigmoid" else SimpoLoss(cfg)
    evaluation = preference.pair_evaluation(loss, valid, collate, cfg.train.batch_size) if valid else None
    return StageData(train, valid, collate, loss, evaluation,
                     check_model=loss.attach if isinstance(loss, DpoLoss) else None)


def check(cfg: DpoConfig) -> None:
    if not cfg.model:
        raise HuayuError("usage: huayu dpo --model SFT_DIR --data PAIRS [--loss sigmoid|simpo] --out DIR")
    if cfg.loss not in LOSSES:
        raise HuayuError(f"--loss must be one of {', '.join(LOSSES)}, got '{cfg.loss}'")
    if beta(cfg) <= 0:
        raise HuayuError(f"--beta must be positive, got {cfg.beta}")
    preference.check(cfg, "dpo")


def add_arguments(parser) -> None:
    add_config_arguments(parser, DpoConfig)


def run(args) -> None:
    cfg = config_from_args(DpoConfig, args)
    check(cfg)
    run_stage(cfg, "dpo", lambda tok: stage_data(cfg, tok), chat_trained=True)
