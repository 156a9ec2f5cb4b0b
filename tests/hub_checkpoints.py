"""Tiny stand-ins for downloaded checkpoints, one per model family, saved as the hub has them.

Each is a random model of the family's architecture beside a tokenizer shaped like the real
checkpoint's: its kind of vocabulary (byte-level BPE, sentencepiece, WordPiece) learned on the
test corpus, its special tokens, the class its tokenizer_config.json declares, the files it ships
(a sentencepiece or WordPiece checkpoint often only tokenizer.model / vocab.txt) and its real chat
template (hub_chat_templates/, copied from the named checkpoint's tokenizer_config.json).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from conftest import DIALOGUES, TEXTS

TEMPLATES = Path(__file__).parent / "hub_chat_templates"
CORPUS = TEXTS + [t for d in DIALOGUES for t in d]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
QWEN_TOKENS = dict(bos_token=None, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   extra_special_tokens=["<|im_start|>", "<|im_end|>"])
GLM_TOKENS = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  extra_special_tokens=["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                                        "<|assistant|>", "<|observation|>"])
SENTENCEPIECE_TOKENS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
BERT_TOKENS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@dataclass(frozen=True)
class Shape:
    """A checkpoint as the hub has it: the architecture, and the tokenizer's kind, files and tokens."""
    name: str
    architecture: str                  # the transformers class in config.json's `architectures`
    vocabulary: str                    # byte-bpe | sentencepiece-bpe | sentencepiece-unigram | wordpiece
    tokenizer_class: str               # as the real tokenizer_config.json declares it
    tokens: dict = field(default_factory=dict)  # its special tokens
    template: str | None = None        # the file in hub_chat_templates/ (None: the checkpoint has none)
    stop_tokens: tuple[str, ...] = ()  # further ends of a reply that its generation_config.json lists
    config: dict = field(default_factory=dict)  # beyond TINY
    vocabulary_file_only: bool = False  # ships tokenizer.model / spiece.model / vocab.txt, no tokenizer.json

    def __str__(self):
        return self.name


GENERATIVE = [
    Shape("qwen2", "Qwen2ForCausalLM", "byte-bpe", "Qwen2Tokenizer", QWEN_TOKENS, "Qwen2-7B-Instruct",
          ("<|endoftext|>",)),
    Shape("qwen3", "Qwen3ForCausalLM", "byte-bpe", "Qwen2Tokenizer", QWEN_TOKENS, "Qwen3-8B", ("<|endoftext|>",),
          dict(head_dim=8)),
    Shape("qwen3-moe", "Qwen3MoeForCausalLM", "byte-bpe", "Qwen2Tokenizer", QWEN_TOKENS, "Qwen3-8B",
          ("<|endoftext|>",), dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    Shape("llama", "LlamaForCausalLM", "sentencepiece-bpe", "LlamaTokenizer", SENTENCEPIECE_TOKENS,
          "Llama-2-7b-chat-hf", vocabulary_file_only=True),
    Shape("mistral", "MistralForCausalLM", "sentencepiece-bpe", "LlamaTokenizer", SENTENCEPIECE_TOKENS,
          "Mistral-7B-Instruct-v0.1"),
    Shape("glm", "GlmForCausalLM", "byte-bpe", "PreTrainedTokenizerFast", GLM_TOKENS, "glm-4-9b-chat",
          ("<|user|>", "<|observation|>"), dict(head_dim=8)),
    Shape("glm4", "Glm4ForCausalLM", "byte-bpe", "PreTrainedTokenizerFast", GLM_TOKENS, "glm-4-9b-chat",
          ("<|user|>", "<|observation|>"), dict(head_dim=8)),
    Shape("gpt2-chinese", "GPT2LMHeadModel", "wordpiece", "BertTokenizer", BERT_TOKENS, vocabulary_file_only=True),
    Shape("bloom", "BloomForCausalLM", "byte-bpe", "BloomTokenizerFast",
          dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")),
    Shape("mt5", "MT5ForConditionalGeneration", "sentencepiece-unigram", "T5Tokenizer",
          dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>"), vocabulary_file_only=True,
          config=dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)),
]
ENCODERS = [Shape("bert", "BertForMaskedLM", "wordpiece", "BertTokenizer", BERT_TOKENS, vocabulary_file_only=True),
            Shape("ernie", "ErnieForMaskedLM", "wordpiece", "BertTokenizer", BERT_TOKENS, vocabulary_file_only=True)]
SHAPES = {shape.name: shape for shape in GENERATIVE + ENCODERS}


def byte_bpe(specials: list[str]) -> tuple[dict, list]:
    """A byte-level BPE (Qwen's, GLM-4's, BLOOM's kind) learned on the test corpus: vocab and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    state = json.loads(tok.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]


def sentencepiece_model(kind: str, **ids) -> bytes:
    """A sentencepiece model (Llama's / Mistral's byte-fallback BPE, mT5's unigram) trained on the test
    corpus, its text kept as written (the identity normalisation those checkpoints use)."""
    import sentencepiece as spm

    proto = io.BytesIO()
    size = dict(vocab_size=420, byte_fallback=True) if kind == "bpe" else dict(vocab_size=100, hard_vocab_limit=False)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=proto, model_type=kind,
                                   character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
                                   **size, **ids)
    return proto.getvalue()


def write_vocabulary_file(shape: Shape, path: Path) -> None:
    """The file a sentencepiece or WordPiece checkpoint's tokenizer is built from, with a
    tokenizer_config.json naming its class."""
    if shape.vocabulary == "sentencepiece-unigram":  # mT5's ids: <pad> 0, </s> 1, <unk> 2, no <s>
        (path / "spiece.model").write_bytes(sentencepiece_model("unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    elif shape.vocabulary == "sentencepiece-bpe":  # Llama's: <unk> 0, <s> 1, </s> 2, no pad
        (path / "tokenizer.model").write_bytes(sentencepiece_model("bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    else:  # a BERT vocab.txt over characters, as the Chinese BERT / ERNIE / GPT-2 checkpoints have
        chars = sorted(set("".join(CORPUS)))
        (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n",
                                        encoding="utf-8")
    config = {"tokenizer_class": shape.tokenizer_class, **shape.tokens}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def save_tokenizer(shape: Shape, path: Path):
    """The tokenizer files of `shape` in `path`; the tokenizer transformers builds from them."""
    import transformers

    tokens = dict(shape.tokens)
    extra = tokens.pop("extra_special_tokens", [])
    if shape.vocabulary == "byte-bpe":
        vocab, merges = byte_bpe(list(dict.fromkeys(t for t in (tokens.get("pad_token"), tokens.get("unk_token"),
                                                                 tokens.get("bos_token"), tokens.get("eos_token"),
                                                                 *extra) if t)))
        tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, **tokens) \
            if shape.tokenizer_class == "Qwen2Tokenizer" else _plain_byte_bpe(vocab, merges, tokens)
    else:
        write_vocabulary_file(shape, path)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if shape.template:
        tok.chat_template = (TEMPLATES / f"{shape.template}.jinja").read_text(encoding="utf-8").removesuffix("\n")
    tok.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": shape.tokenizer_class},
                                                           ensure_ascii=False), encoding="utf-8")
    if shape.vocabulary_file_only:
        (path / "tokenizer.json").unlink()
    return tok


def _plain_byte_bpe(vocab: dict, merges: list, tokens: dict):
    """GLM-4's and BLOOM's kind: a tokenizer.json pipeline with no class of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def save_checkpoint(shape: Shape, path: Path) -> str:
    """A tiny random `shape` model with its tokenizer, saved as a downloaded checkpoint is."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(shape, path)
    model_class = getattr(transformers, shape.architecture)
    ids = {f"{k}_id": tok.convert_tokens_to_ids(v) for k, v in shape.tokens.items()
           if k in ("bos_token", "eos_token", "pad_token") and v}
    config = model_class.config_class(vocab_size=len(tok), **TINY, **ids, **shape.config)
    if config.is_encoder_decoder:
        config.decoder_start_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = model_class(config)
    stops = [tok.convert_tokens_to_ids(t) for t in shape.stop_tokens]
    if stops:
        model.generation_config.eos_token_id = [tok.eos_token_id, *stops]
    model.save_pretrained(path)
    return str(path)


def assert_spells_the_corpus(tokenizer) -> None:
    """Every character of the test corpus survives a round trip, none of it unknown."""
    for text in CORPUS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids and tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids).replace(" ", "") == text
