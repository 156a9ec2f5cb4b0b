"""`huayu rm`: a reward model from an SFT model and preference pairs; `huayu rm score` and
`huayu rm compare` use one.

The reward model is the SFT model with a one-output sequence-classification head
(AutoModelForSequenceClassification, num_labels=1): its score of prompt + reply is read at the
reply's last token, which transformers finds by the pad token id set in its config, so plain
transformers loads and scores with it as huayu does. It learns the pairwise loss
−log σ(r_chosen − r_rejected) (InstructGPT's, as trl's RewardTrainer and LLaMA-Factory's rm stage
train it), fully, frozen but for the last layers and the head, or with LoRA (the head is trained
and saved with the adapter). Every eval_every steps the held-out pairs' accuracy (the share where
the chosen reply scores higher) and mean margin are measured, and the most accurate checkpoint is
kept as the final model, as finetune-cls keeps its best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from huayu.config import add_config_arguments, config_from_args, field_doc, save_config
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs
from huayu.outputs import OVERWRITE_HELP, check_output_dir, claim_output_dir
from huayu.train import preference
from huayu.train.stage import StageData, run_stage

REWARD_HEAD = ["reward"]  # the classifier's one output
BEST_METRIC = "accuracy"


@dataclass
class RewardConfig(preference.PreferenceConfig):
    model: str = field_doc("the SFT model the reward model starts from (a model directory)", default=None)
    out: str = field_doc("output directory", default="out/rm")


def reward_loss(model, batch: dict):
    """The pairwise loss of a batch's rewards, with the pairs' accuracy and mean margin."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    chosen, rejected = rewards.chunk(2)
    margin = chosen - rejected
    return preference.pairwise_loss(chosen, rejected), {"accuracy": (margin > 0).float().mean().item(),
                                                        "margin": margin.mean().item()}


def pads_with(tokenizer):
    """Set the pad token id a sequence classifier finds each sequence's last token by (a model
    loaded from an SFT directory may have none in its config)."""
    def set_pad(model) -> None:
        model.config.pad_token_id = tokenizer.pad_token_id

    return set_pad


def stage_data(cfg: RewardConfig, tokenizer) -> StageData:
    from huayu.data.preferences import pair_collate

    train, valid = preference.build_pairs(cfg, tokenizer)
    collate = pair_collate(tokenizer.pad_token_id)
    evaluation = preference.pair_evaluation(reward_loss, valid, collate, cfg.train.batch_size,
                                            best=BEST_METRIC) if valid else None
    return StageData(train, valid, collate, reward_loss, evaluation, classes=REWARD_HEAD,
                     check_model=pads_with(tokenizer))


def check(cfg: RewardConfig) -> None:
    if not cfg.model:
        raise HuayuError("usage: huayu rm --model SFT_DIR --data PAIRS [--valid-data PAIRS] --out DIR")
    if cfg.finetuning.finetuning_type == "prefix":
        raise HuayuError("huayu rm trains --finetuning-type full, freeze or lora, not prefix: a prefix adapter "
                         "scores through the model's cache, which a classifier's last-token reward does not use")
    preference.check(cfg, "rm")


def add_arguments(parser) -> None:
    add_config_arguments(parser, RewardConfig)


def run(args) -> None:
    cfg = config_from_args(RewardConfig, args)
    check(cfg)
    run_stage(cfg, "rm", lambda tok: stage_data(cfg, tok), chat_trained=True)


# ---------------------------------------------------------------- scoring


@dataclass
class ScoringArgs:
    max_source_length: int = field_doc("max tokens of a prompt (as in training)", default=256)
    max_target_length: int = field_doc("max tokens of a reply (as in training)", default=256)
    batch_size: int = field_doc("sequences per batch", default=8)
    device: str = field_doc("auto | cpu | cuda (auto: a CUDA GPU when there is one)", default="auto")
    skip_invalid: bool = field_doc("skip malformed records (reported) instead of stopping", default=False)


class RewardModel:
    """A reward model (huayu rm's output, or its LoRA adapter on the base) that scores replies."""

    def __init__(self, path: str, args: ScoringArgs):
        import torch

        from huayu.models.families import family_of
        from huayu.models.loading import load_model, load_tokenizer
        from huayu.train.distributed import resolve_device

        if not Path(path).is_dir():
            raise HuayuError(f"reward model '{path}' is not a directory (train one with huayu rm)")
        self.args, self.tokenizer = args, load_tokenizer(path)
        self.model = load_model(path, self.tokenizer, dtype=torch.float32, classes=REWARD_HEAD).eval()
        pads_with(self.tokenizer)(self.model)  # an adapter's base config may lack it
        self.model.to(resolve_device(args.device))
        self.family = family_of(self.model.config)

    def scores(self, prompts: list[list[dict]], replies: list[str]) -> list[float]:
        """The reward of each reply after its prompt, encoded as in training."""
        import torch

        from huayu.data.batching import pad_collate, to_device

        a = self.args
        examples = [self.family.encode_dialogue(self.tokenizer, prompt + [{"role": "assistant", "content": reply}],
                                                a.max_source_length, a.max_target_length, "last")
                    for prompt, reply in zip(prompts, replies)]
        collate, scores = pad_collate(self.tokenizer.pad_token_id), []
        for start in range(0, len(examples), a.batch_size):
            batch = to_device(collate(examples[start:start + a.batch_size]), self.model.device)
            with torch.inference_mode():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores += logits[:, 0].float().tolist()
        return scores

    def judge(self, pairs: list) -> tuple[dict, list[tuple[float, float]]]:
        """Accuracy and mean margin on preference pairs, and each pair's (chosen, rejected) scores."""
        prompts = [p.prompt for p in pairs]
        chosen = self.scores(prompts, [p.chosen for p in pairs])
        rejected = self.scores(prompts, [p.rejected for p in pairs])
        metrics = {"pairs": len(pairs), "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
                   "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}
        return metrics, list(zip(chosen, rejected))


def read_pairs(paths: list[str], skip_invalid: bool, max_samples: int = 0) -> list:
    from huayu.data.preferences import read_preference_files

    pairs = read_preference_files(paths, skip_invalid)
    if not pairs:
        raise HuayuError(f"no preference pairs in {', '.join(paths)}")
    return pairs[:max_samples] if max_samples else pairs


@dataclass
class ScoreConfig:
    model: str = field_doc("reward model directory (huayu rm's output)", default=None)
    data: list[str] = field_doc("preference files: print the reward model's accuracy and mean margin on them",
                                default_factory=list)
    prompt: str | None = field_doc("a prompt (one user turn) whose --response replies are scored", default=None)
    response: list[str] = field_doc("replies to --prompt, each scored", default_factory=list)
    out: str | None = field_doc("with --data: also write each pair's scores to this JSONL file", default=None)
    scoring: ScoringArgs = field(default_factory=ScoringArgs, metadata={"help": "scoring"})


def add_score_arguments(parser) -> None:
    add_config_arguments(parser, ScoreConfig)


def run_score(args) -> None:
    cfg = config_from_args(ScoreConfig, args)
    if not cfg.model or bool(cfg.data) == bool(cfg.prompt or cfg.response) or bool(cfg.prompt) != bool(cfg.response):
        raise HuayuError("usage: huayu rm score --model RM_DIR --data PAIRS [--out SCORES.jsonl]  or  "
                         "huayu rm score --model RM_DIR --prompt TEXT --response TEXT [TEXT ...]")
    if cfg.out and Path(cfg.out).exists():
        raise HuayuError(f"--out {cfg.out} exists: choose another file name")
    pairs = read_pairs(cfg.data, cfg.scoring.skip_invalid) if cfg.data else None
    rm = RewardModel(cfg.model, cfg.scoring)
    if pairs is None:
        for score, reply in zip(rm.scores([[{"role": "user", "content": cfg.prompt}]] * len(cfg.response),
                                          cfg.response), cfg.response):
            print(f"{score:.4f}\t{reply}")
        return
    metrics, scores = rm.judge(pairs)
    print(json.dumps(metrics, indent=2))
    if cfg.out:
        rows = [{"source": p.source, "chosen": c, "rejected": r} for p, (c, r) in zip(pairs, scores)]
        Path(cfg.out).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                 encoding="utf-8")


# ---------------------------------------------------------------- comparing policies


@dataclass
class CompareConfig:
    reward_model: str = field_doc("the judge: a reward model directory (huayu rm's output)", default=None)
    model: list[str] = field_doc("the models to compare with --baseline (e.g. huayu dpo's outputs)",
                                 default_factory=list)
    baseline: str = field_doc("the model they are compared with (e.g. the SFT model they started from)",
                              default=None)
    data: list[str] = field_doc("held-out preference files: every model answers their prompts, and their pairs "
                                "measure the reward model's accuracy", default_factory=list)
    max_samples: int = field_doc("use only the first N pairs (0: all)", default=0)
    out: str = field_doc("directory for compare.json, compare.md and the replies", default="out/compare")
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)
    scoring: ScoringArgs = field(default_factory=ScoringArgs, metadata={"help": "scoring"})
    decoding: DecodingArgs = field(default_factory=DecodingArgs, metadata={"help": "decoding"})


def replies(path: str, prompts: list[list[dict]], cfg: CompareConfig) -> list[str]:
    """The replies of the model at `path` (a model or adapter directory) to `prompts`."""
    from huayu.generation import Generator
    from huayu.models.loading import InferenceArgs

    gen = Generator.load(path, placement=InferenceArgs(device=cfg.scoring.device))
    size, out = cfg.scoring.batch_size, []
    for start in range(0, len(prompts), size):
        ids = [gen.encode_chat(p, cfg.scoring.max_source_length) for p in prompts[start:start + size]]
        out += [reply.strip() for reply in gen.generate_ids(ids, cfg.decoding)]
    return out


def win_rate(scores: list[float], baseline: list[float], same: list[bool]) -> dict:
    """Wins, ties (equal scores, or the same reply: batched with other replies, its score may differ
    in the last float bits) and losses against the baseline; a tie counts half."""
    ties = sum(tie or s == b for s, b, tie in zip(scores, baseline, same))
    wins = sum(s > b and not tie for s, b, tie in zip(scores, baseline, same))
    return {"win_rate": (wins + ties / 2) / len(scores), "wins": wins, "ties": ties,
            "losses": len(scores) - wins - ties, "mean_reward": sum(scores) / len(scores),
            "baseline_mean_reward": sum(baseline) / len(baseline)}


def compare(cfg: CompareConfig) -> dict:
    """The reward model's accuracy on the held-out pairs, and each model's win rate against the
    baseline on their prompts as that reward model judges the replies."""
    if not (cfg.reward_model and cfg.model and cfg.baseline and cfg.data):
        raise HuayuError("usage: huayu rm compare --reward-model RM_DIR --model DIR [DIR ...] --baseline SFT_DIR "
                         "--data HELD_OUT_PAIRS --out DIR")
    check_output_dir(cfg.out, "rm compare", cfg.overwrite)
    pairs = read_pairs(cfg.data, cfg.scoring.skip_invalid, cfg.max_samples)
    prompts = [p.prompt for p in pairs]
    generated = {path: replies(path, prompts, cfg) for path in [cfg.baseline, *cfg.model]}
    rm = RewardModel(cfg.reward_model, cfg.scoring)
    judged, _ = rm.judge(pairs)
    scores = {path: rm.scores(prompts, texts) for path, texts in generated.items()}
    result = {"reward_model": cfg.reward_model, "reward_accuracy": judged, "baseline": cfg.baseline,
              "models": {path: win_rate(scores[path], scores[cfg.baseline],
                                        [a == b for a, b in zip(generated[path], generated[cfg.baseline])])
                         for path in cfg.model}}
    rows = [{"source": p.source, "prompt": p.prompt[-1]["content"],
             **{path: {"reply": generated[path][i], "reward": scores[path][i]} for path in generated}}
            for i, p in enumerate(pairs)]
    _write(Path(cfg.out), cfg, result, rows)
    return result


def markdown(result: dict) -> str:
    acc = result["reward_accuracy"]
    lines = [f"Reward model {result['reward_model']}: accuracy {acc['accuracy']:.3f} (mean margin "
             f"{acc['margin']:.3f}) on {acc['pairs']} held-out pairs.", "",
             f"| model | win rate vs {result['baseline']} | wins / ties / losses | mean reward "
             "| baseline mean reward |",
             "|---|---|---|---|---|"]
    lines += [f"| {path} | {r['win_rate']:.3f} | {r['wins']} / {r['ties']} / {r['losses']} | {r['mean_reward']:.3f} "
              f"| {r['baseline_mean_reward']:.3f} |" for path, r in result["models"].items()]
    return "\n".join(lines) + "\n"


def _write(out: Path, cfg: CompareConfig, result: dict, rows: list[dict]) -> None:
    claim_output_dir(out, "rm compare", cfg.overwrite)
    save_config(cfg, out / "config.yaml")
    files = {"compare.json": json.dumps(result, ensure_ascii=False, indent=2) + "\n", "compare.md": markdown(result),
             "replies.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)}
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def add_compare_arguments(parser) -> None:
    add_config_arguments(parser, CompareConfig)


def run_compare(args) -> None:
    print(markdown(compare(config_from_args(CompareConfig, args))), end="")
