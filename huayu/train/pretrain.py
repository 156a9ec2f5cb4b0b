"""`huayu pretrain`: pre-training on packed text, with the objective of the model's family.

Decoder-only models learn the causal LM: records with only a text field are continuation training;
records that also carry a target (`tgt_txt`, as in the GPT-3 seed) are input->output training with
loss on the target only. Encoder-decoder models learn T5's span corruption: the token stream is cut
into chunks whose corrupted form is exactly `seq_len` tokens, spans replaced by sentinels. Either
way the examples are cached on disk (huayu/data/cache.py), so a corpus is tokenized once.
Encoders (BERT, ERNIE) learn the masked LM with whole-word masking and optionally sentence-order
prediction, from a token store built by `huayu data index` (huayu/data/whole_word_masking.py); GLM
learns autoregressive blank infilling from such a store (huayu/data/blank_infilling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.batching import to_device
from huayu.data.blank_infilling import BlankArgs
from huayu.data.cache import DataCacheConfig, add_no_cache_flag
from huayu.data.whole_word_masking import MaskingArgs
from huayu.errors import HuayuError
from huayu.train.stage import StageConfig, run_stage


OBJECTIVES = ("auto", "causal", "span", "mlm", "blank")
STORE_OBJECTIVES = ("mlm", "blank")  # trained from a token store


@dataclass
class PretrainConfig(BlankArgs, MaskingArgs, DataCacheConfig, StageConfig):
    out: str = field_doc("output directory", default="out/pretrain")
    text_field: str | None = field_doc("JSON field with the text (default: text, src_txt or content)",
                                       default=None)
    target_field: str = field_doc("JSON field that makes a record input->output", default="tgt_txt")
    seq_len: int = field_doc("tokens per packed block (span: per corrupted encoder input)", default=256)
    objective: str = field_doc(f"{' | '.join(OBJECTIVES)}; auto: the family's (causal for decoders, span for "
                               "encoder-decoders, mlm for encoders, blank for GLM)", default="auto")
    eval_samples: int = field_doc("mlm, blank: validation samples (masked with a fixed seed) per evaluation",
                                  default=512)
    noise_density: float = field_doc("span: share of tokens masked", default=0.15)
    mean_noise_span_length: float = field_doc("span: mean length of a masked span", default=3.0)


def block_dataset(tokenizer, paths: list[str], seq_len: int, skip_invalid: bool, cache: DataCacheConfig,
                  text_field: str | None = None, target_field: str = "tgt_txt"):
    """The text records of `paths` tokenized, joined with EOS and cut into `seq_len`-token blocks,
    as an Arrow dataset (shared with `huayu sft --replay-data`)."""
    from tqdm.auto import tqdm

    from huayu.data.cache import cached_dataset
    from huayu.data.packing import pack, tokenize_records
    from huayu.data.sources import read_text_files

    def build(notes: list[str]):
        records = read_text_files(paths, text_field, target_field, skip_invalid, report=notes.append)
        with_target = sum(r.target is not None for r in records)
        pairs = tqdm(tokenize_records(tokenizer, records), total=len(records), desc="tokenize", unit="doc",
                     leave=False)
        blocks = pack(pairs, seq_len)
        notes.append(f"{', '.join(paths)}: {len(records):,} records ({with_target:,} input->output) -> "
                     f"{len(blocks):,} blocks of {seq_len} tokens")
        return blocks

    options = {"text_field": text_field, "target_field": target_field, "skip_invalid": skip_invalid,
               "seq_len": seq_len}
    return cached_dataset("blocks", paths, tokenizer, options, build, cache)


def span_dataset(tokenizer, paths: list[str], cfg: PretrainConfig):
    """T5 span-corruption examples of `paths` (documents joined by eos), as a cached Arrow dataset."""
    from huayu.data.cache import cached_dataset
    from huayu.data.packing import tokenize_records
    from huayu.data.sources import read_text_files
    from huayu.data.span_corruption import span_corruption_examples

    def build(notes: list[str]):
        records = read_text_files(paths, cfg.text_field, cfg.target_field, cfg.skip_invalid, report=notes.append)
        stream = [t for ids, _ in tokenize_records(tokenizer, records) for t in ids]
        examples = span_corruption_examples(stream, tokenizer, cfg.seq_len, cfg.noise_density,
                                            cfg.mean_noise_span_length, seed=cfg.train.seed)
        notes.append(f"{', '.join(paths)}: {len(records):,} records, {len(stream):,} tokens -> {len(examples):,} "
                     f"span-corrupted inputs of {cfg.seq_len} tokens (noise {cfg.noise_density}, mean span "
                     f"{cfg.mean_noise_span_length})")
        return examples

    options = {"text_field": cfg.text_field, "skip_invalid": cfg.skip_invalid, "seq_len": cfg.seq_len,
               "noise_density": cfg.noise_density, "mean_noise_span_length": cfg.mean_noise_span_length,
               "seed": cfg.train.seed}
    return cached_dataset("span", paths, tokenizer, options, build, cfg)


def objective(cfg: PretrainConfig) -> str:
    """The objective to train: the family's unless given; one the family cannot learn is an error."""
    from huayu.models.families import family_of_model

    family = family_of_model(cfg.model)
    if cfg.objective not in OBJECTIVES:
        raise HuayuError(f"--objective must be one of {', '.join(OBJECTIVES)}, got '{cfg.objective}'")
    chosen = family.default_objective if cfg.objective == "auto" else cfg.objective
    if chosen != family.default_objective:
        raise HuayuError(f"--objective {chosen} does not fit '{cfg.model}', a {family.name} model: "
                         f"use --objective {family.default_objective}")
    return chosen


def store_data(cfg: PretrainConfig, tokenizer, chosen: str):
    """Samples of the token store in --data (its train split; a --valid-data store whole, else the
    valid split), masked as batches are drawn: whole-word masking (mlm) or blank infilling."""
    import numpy as np

    from huayu.data.blank_infilling import BlankInfilling, text_budget
    from huayu.data.token_store import TokenStore, is_store
    from huayu.data.whole_word_masking import WholeWordMasking, build_samples, mlm_loss
    from huayu.train.loop import Evaluation, model_loss
    from huayu.train.stage import StageData

    for path in cfg.data + cfg.valid_data:
        if not is_store(path):
            raise HuayuError(f"--objective {chosen} reads token stores: '{path}' is not one; build it with "
                             f"`huayu data index CORPUS --out PREFIX --tokenizer DIR` and pass PREFIX")
    if len(cfg.data) != 1:
        raise HuayuError(f"--objective {chosen} trains on one token store (--data PREFIX); index several corpora "
                         "into it")
    blank = chosen == "blank"

    def collate_for(store):
        _check_store_vocabulary(store, tokenizer)
        if blank:
            return BlankInfilling(store, tokenizer, cfg.seq_len, cfg)
        return WholeWordMasking(store, tokenizer, cfg.seq_len, cfg.masked_lm_prob, cfg.sop)

    def samples_of(store, documents):
        if blank:  # whole sentences up to the text budget, no short samples: [gMASK] spans vary the length
            return build_samples(store, documents, text_budget(cfg.seq_len, cfg.blank_ratio) + 2, 0.0, False,
                                 cfg.train.seed)
        return build_samples(store, documents, cfg.seq_len, cfg.short_seq_prob, cfg.sop, cfg.train.seed)

    store = TokenStore(cfg.data[0])
    train_docs, valid_docs, _ = store.split(cfg.split)
    samples, collate = samples_of(store, train_docs), collate_for(store)
    valid_store = TokenStore(cfg.valid_data[0]) if cfg.valid_data else store
    if cfg.valid_data:
        valid_docs = np.arange(valid_store.n_documents)
    valid = samples_of(valid_store, valid_docs)
    valid = valid[np.random.default_rng(cfg.train.seed).permutation(len(valid))[:cfg.eval_samples]]
    print(f"{cfg.data[0]}: {len(train_docs):,} training documents -> {len(samples):,} samples of up to "
          f"{cfg.seq_len} tokens; {len(valid):,} validation samples")
    valid_collate = collate_for(valid_store) if cfg.valid_data else collate
    loss_fn = model_loss if blank else mlm_loss
    evaluation = Evaluation(lambda model: fixed_mask_validation(model, valid, valid_collate, loss_fn,
                                                                cfg.train.batch_size, cfg.train.seed)) \
        if len(valid) else None
    return StageData(samples, valid if len(valid) else None, collate, loss_fn, evaluation)


def _check_store_vocabulary(store, tokenizer) -> None:
    """The store's ids are the tokenizer's: same vocabulary, or GLM's tokens appended to it."""
    appended = sum(i >= store.meta["vocab_size"] for i in tokenizer.added_tokens_decoder)
    if store.meta["vocab_size"] != len(tokenizer) - appended:
        raise HuayuError(f"token store '{store.prefix}' was built with a tokenizer of {store.meta['vocab_size']} "
                         f"tokens ({store.meta['tokenizer']}), the model's has {len(tokenizer)}")


def fixed_mask_validation(model, samples, collate, loss_fn, batch_size: int, seed: int) -> dict[str, float]:
    """Mean loss and its parts over `samples`, masked the same way at every evaluation (a fixed
    seed, torch's training random state put back afterwards)."""
    import torch

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    batches = range(0, len(samples), batch_size)
    for start in batches:
        loss, parts = loss_fn(model, to_device(collate(samples[start:start + batch_size]), model.device))
        for key, value in {"loss": loss.item(), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value / len(batches)
    torch.set_rng_state(state)
    return sums


def build_examples(cfg: PretrainConfig, tokenizer):
    from huayu.data.cache import ArrowExamples

    chosen = objective(cfg)
    if chosen in STORE_OBJECTIVES:
        return store_data(cfg, tokenizer, chosen)
    span = chosen == "span"

    def examples(paths):
        if span:
            return ArrowExamples(span_dataset(tokenizer, paths, cfg))
        return ArrowExamples(block_dataset(tokenizer, paths, cfg.seq_len, cfg.skip_invalid, cfg, cfg.text_field,
                                           cfg.target_field))

    return examples(cfg.data), (examples(cfg.valid_data) if cfg.valid_data else None)


def add_arguments(parser) -> None:
    add_config_arguments(parser, PretrainConfig)
    add_no_cache_flag(parser)


def run(args) -> None:
    cfg = config_from_args(PretrainConfig, args)
    objective(cfg)  # before any data is read
    run_stage(cfg, "pretrain", lambda tok: build_examples(cfg, tok))
