"""`huayu sft`: supervised fine-tuning on multi-turn dialogues or instructions.

Loss is on assistant turns by default (`all`: every token; `last`: the final reply only). The reply
is cut to `max_target_length`, the context (from its oldest turn) to `max_source_length` and to what
`max_seq_length` leaves beside the reply; `skip_overlength` drops too-long examples instead. Every
cut or dropped example is counted and reported. Encoded examples are cached on disk
(huayu/data/cache.py). `replay_data` mixes general data in, against forgetting it. `template`
renders the dialogues with one of the field's chat templates or a .jinja file, and is saved with
the output; `system` gives every dialogue without a system message that one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.batching import Example
from huayu.data.cache import DataCacheConfig, add_no_cache_flag
from huayu.data.chat import LOSS_ON
from huayu.data.chat_templates import TEMPLATE_HELP
from huayu.data.sources import DialogueDataArgs
from huayu.errors import HuayuError
from huayu.train.stage import StageConfig, StageData, run_stage


@dataclass
class SftConfig(DataCacheConfig, StageConfig):
    out: str = field_doc("output directory", default="out/sft")
    dialogue: DialogueDataArgs = field_doc("how dialogues are read and cut", default_factory=DialogueDataArgs)
    loss_on: str = field_doc(f"which tokens carry loss: {', '.join(LOSS_ON)}", default="assistant")
    template: str | None = field_doc(TEMPLATE_HELP + "; saved with the output, so inference renders chats "
                                     "as training did", default=None)
    system: str | None = field_doc("system message given to every dialogue that has none", default=None)
    packing: bool = field_doc("decoder-only models: pack examples into rows of max_seq_length tokens, each attending "
                              "only to itself (positions restart, no padding; the loss is the unpacked loss)",
                              default=False)
    max_seq_length: int = field_doc("max tokens of context + reply (0: max_source_length + max_target_length)",
                                    default=0)
    skip_overlength: bool = field_doc("drop (and count) dialogues longer than max_seq_length instead of "
                                      "truncating them", default=False)
    replay_data: list[str] = field_doc("general data mixed in against forgetting: dialogue/instruction files, "
                                       "or text corpora packed into max_seq_length blocks", default_factory=list)
    replay_ratio: float = field_doc("replay examples per training example (0.2: 200 per 1000)", default=0.2)


def seq_limit(cfg: SftConfig) -> int:
    return cfg.max_seq_length or cfg.dialogue.max_source_length + cfg.dialogue.max_target_length


def fit_dialogue(tokenizer, messages: list[dict], cfg: SftConfig, loss_on: str) -> tuple[Example | None, bool]:
    """(example or None, whether it was cut) of one dialogue within the length limits; None when
    it is longer than max_seq_length and skip_overlength is set."""
    from huayu.models.families import family_of_model

    d, limit = cfg.dialogue, seq_limit(cfg)
    example = family_of_model(cfg.model).encode_dialogue(tokenizer, messages, d.max_source_length,
                                                         d.max_target_length, loss_on, limit)
    if cfg.skip_overlength and example.full_length > limit:
        return None, False
    return example, example.full_length > len(example.input_ids)


def dialogue_examples(tokenizer, messages: list[dict], cfg: SftConfig) -> list[tuple[list[dict], str]]:
    """(messages, loss_on) of the examples one dialogue gives: itself, with --system added, plus
    for a causal LM each reply its template renders otherwise later in the dialogue (Qwen3's),
    as the dialogue up to it (huayu.data.chat.training_dialogues)."""
    from huayu.data.chat import training_dialogues
    from huayu.data.chat_templates import with_system
    from huayu.models.families import CAUSAL, family_of_model

    messages = with_system(messages, cfg.system)
    if family_of_model(cfg.model).layout != CAUSAL:  # the others learn only the last reply
        return [(messages, cfg.loss_on)]
    return training_dialogues(tokenizer, messages, cfg.loss_on)


def encode_dialogues(tokenizer, dialogues: list, cfg: SftConfig, split: str, notes: list[str]):
    """Yield the examples of `dialogues`; how many were cut or dropped is appended to `notes`."""
    from tqdm.auto import tqdm

    examples = cut = dropped = 0
    for dialogue in tqdm(dialogues, desc=f"encode {split}", unit="dlg", leave=False):
        for messages, loss_on in dialogue_examples(tokenizer, dialogue.messages, cfg):
            example, truncated = fit_dialogue(tokenizer, messages, cfg, loss_on)
            if example is None:
                dropped += 1
                continue
            examples += 1
            cut += truncated
            yield example
    d, limit = cfg.dialogue, seq_limit(cfg)
    note = (f"{split}: {len(dialogues):,} dialogues -> {examples:,} examples; {cut:,} truncated "
            f"to max source/target/total length {d.max_source_length}/{d.max_target_length}/{limit}")
    if cfg.skip_overlength:
        note += f"; {dropped:,} longer than {limit} tokens dropped (--skip-overlength)"
    notes.append(note)


def dialogue_dataset(cfg: SftConfig, tokenizer, paths: list[str], split: str):
    """The encoded dialogues of `paths` as an Arrow dataset, cached under everything they depend on."""
    from huayu.data.cache import cached_dataset
    from huayu.data.sources import read_dialogue_files

    def build(notes: list[str]):
        dialogues = read_dialogue_files(paths, cfg.dialogue, cfg.skip_invalid, split, report=notes.append)
        trailing = sum(x.messages[-1]["role"] != "assistant" for x in dialogues)
        if trailing:
            notes.append(f"{trailing} {split} dialogues end with turns after the last assistant reply; those "
                         "turns have no reply to learn and are not used")
        return encode_dialogues(tokenizer, dialogues, cfg, split, notes)

    from huayu.models.families import family_of_model

    options = {"family": family_of_model(cfg.model).name, "dialogue": asdict(cfg.dialogue), "split": split,
               "skip_invalid": cfg.skip_invalid, "system": cfg.system,
               "loss_on": cfg.loss_on, "max_seq_length": seq_limit(cfg), "skip_overlength": cfg.skip_overlength}
    return cached_dataset("sft", paths, tokenizer, options, build, cfg)


def replay_dataset(cfg: SftConfig, tokenizer):
    """Every example the replay data gives: its dialogues encoded like the training data (format
    detected per file), its text corpora packed into max_seq_length blocks."""
    from datasets import concatenate_datasets

    from huayu.data.sources import holds_dialogues
    from huayu.train.pretrain import block_dataset

    dialogue_paths = [p for p in cfg.replay_data if holds_dialogues(p)]
    text_paths = [p for p in cfg.replay_data if p not in dialogue_paths]
    parts = []
    if dialogue_paths:
        general = replace(cfg.dialogue, format="auto", prompt_column=None, response_column=None)
        parts.append(dialogue_dataset(replace(cfg, dialogue=general), tokenizer, dialogue_paths, "train"))
    if text_paths:
        from huayu.models.families import BLANK, family_of_model

        if family_of_model(cfg.model).layout == BLANK:
            raise HuayuError(f"--replay-data {', '.join(text_paths)}: plain text is replayed as causal-LM blocks, "
                             "which a GLM does not learn from; replay dialogue files, or continue pre-training "
                             "with --objective blank")
        parts.append(block_dataset(tokenizer, text_paths, seq_limit(cfg), cfg.skip_invalid, cfg))
    return concatenate_datasets(parts)


def replay_indices(available: int, wanted: int, seed: int) -> list[int]:
    """`wanted` indices into `available` replay examples, drawn with `seed`: a sample without
    replacement, or when too few are available, each one ⌊wanted/available⌋ times plus a sample."""
    rounds, rest = divmod(wanted, available)
    return sorted(list(range(available)) * rounds + random.Random(seed).sample(range(available), rest))


def mix_replay(train, replay, cfg: SftConfig):
    """`train` plus replay_ratio × len(train) replay examples, one list for the loop to shuffle."""
    from datasets import concatenate_datasets

    if len(replay) == 0:
        raise HuayuError(f"the replay data ({', '.join(cfg.replay_data)}) produced no examples")
    wanted = round(cfg.replay_ratio * len(train))
    print(f"replay: {len(train):,} training examples + {wanted:,} replay examples (ratio {cfg.replay_ratio}) "
          f"drawn from the {len(replay):,} of {', '.join(cfg.replay_data)} = {len(train) + wanted:,}")
    if wanted > len(replay):
        print(f"replay: only {len(replay):,} available, so each is used {wanted / len(replay):.2f} times on average")
    picked = replay.select(replay_indices(len(replay), wanted, cfg.train.seed), keep_in_memory=True)
    return concatenate_datasets([train, picked])


def build_examples(cfg: SftConfig, tokenizer):
    from huayu.data.cache import ArrowExamples
    from huayu.data.chat import ensure_chat_template
    from huayu.data.chat_templates import use_template

    # before the cache key is computed: the template shapes the ids; the tokenizer is saved with it
    use_template(tokenizer, cfg.template)
    ensure_chat_template(tokenizer)
    train = dialogue_dataset(cfg, tokenizer, cfg.data, "train")
    if cfg.replay_data:
        train = mix_replay(train, replay_dataset(cfg, tokenizer), cfg)
    valid = dialogue_dataset(cfg, tokenizer, cfg.valid_data, "valid") if cfg.valid_data else None
    train, valid = ArrowExamples(train), (ArrowExamples(valid) if valid is not None else None)
    return packed(train, valid, cfg, tokenizer) if cfg.packing else (train, valid)


def packed(train, valid, cfg: SftConfig, tokenizer) -> StageData:
    """The examples packed into rows of max_seq_length tokens (validation too: the same loss, less
    padding), with the check that this model keeps packed sequences apart."""
    from huayu.data.batching import packed_collate
    from huayu.data.packing import PackedExamples

    limit = seq_limit(cfg)
    rows = PackedExamples(train, limit)
    print(f"packing: {len(train):,} examples -> {len(rows):,} rows of at most {limit} tokens, "
          f"{100 * rows.fill:.1f}% filled")
    return StageData(rows, PackedExamples(valid, limit) if valid is not None else None,
                     collate=packed_collate(tokenizer.pad_token_id), check_model=lambda m: check_isolation(m, train))


def check_isolation(model, examples) -> None:
    """transformers keeps packed sequences apart in the architectures whose attention mask it
    builds from the position ids (Llama, Qwen, Mistral, GLM-4, ...), not in all (ALiBi models take
    positions from the mask): checked on this model before it trains, the second of two short
    packed sequences must give the logits it gives alone."""
    import torch

    from huayu.data.batching import PackedRow, packed_collate, to_device

    parts = [examples[i] for i in range(min(2, len(examples)))]
    if len(parts) < 2:
        return
    ids = [list(map(int, e.input_ids[:16])) for e in parts]
    row = PackedRow(ids[0] + ids[1], [0] * (len(ids[0]) + len(ids[1])),
                    list(range(len(ids[0]))) + list(range(len(ids[1]))), 2)
    batch = to_device(packed_collate(0)([row]), next(model.parameters()).device)
    batch.pop("labels")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        together = model(**batch).logits[0, len(ids[0]):].float()
        alone = model(input_ids=batch["input_ids"][:, len(ids[0]):], use_cache=False).logits[0].float()
    model.train(was_training)
    tolerance = (1e-4 if model.dtype == torch.float32 else 3e-2) * max(float(alone.abs().max()), 1)
    if float((together - alone).abs().max()) > tolerance:
        raise HuayuError(f"--packing: {model.config.model_type} models let packed sequences see each other (their "
                         "attention does not follow the restarting position ids); train without --packing "
                         "(--group-by-length cuts padding instead)")


def check(cfg: SftConfig) -> None:
    if cfg.loss_on not in LOSS_ON:
        raise HuayuError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got '{cfg.loss_on}'")
    if cfg.max_seq_length < 0:
        raise HuayuError("--max-seq-length must be 0 (source + target length) or positive")
    if cfg.replay_data and cfg.replay_ratio <= 0:
        raise HuayuError("--replay-ratio must be positive when --replay-data is given")
    if cfg.packing:
        from huayu.models.families import CAUSAL, family_of_model

        family = family_of_model(cfg.model)
        if family.layout != CAUSAL:
            raise HuayuError(f"--packing packs decoder-only examples; a {family.name} model's are not one sequence "
                             "each: train it without --packing (--group-by-length cuts padding instead)")


def add_arguments(parser) -> None:
    add_config_arguments(parser, SftConfig)
    add_no_cache_flag(parser)


def run(args) -> None:
    cfg = config_from_args(SftConfig, args)
    check(cfg)
    run_stage(cfg, "sft", lambda tok: build_examples(cfg, tok), chat_trained=True)
