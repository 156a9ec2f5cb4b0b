"""Classification as blank filling, GLM's way of fine-tuning for understanding tasks (Du et al. 2022,
section 2.3; the PET patterns of Schick and Schütze 2021).

A pattern turns a text into a cloze question with one [MASK] (`{text}。总之，真是[MASK]。`) and a
verbalizer names the word that fills the blank for each class (1 -> 好, 0 -> 差). A class's score is
the log-likelihood of its word in the blank, summed over the word's tokens. All candidates are
scored in one forward pass: each is its own Part B span at the blank's position, isolated from the
others (huayu/models/glm.py's `span_attention_mask(..., isolate=True)`), so each is scored as if it
were alone. Fine-tuning is cross-entropy over the class scores, so no new head is learned.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from huayu.data.batching import IGNORE
from huayu.data.chat import plain_ids
from huayu.errors import HuayuError

DEFAULT_PATTERN = "{text}。总之，真是[MASK]。"
CLOZE_FILE = "cloze.json"


@dataclass
class Cloze:
    """A pattern and, in class order, the classes and their verbalizer words."""
    pattern: str
    classes: list[str]
    words: list[str]

    def save(self, directory: str | Path) -> None:
        tmp = Path(directory, f".{CLOZE_FILE}.tmp")
        tmp.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.replace(Path(directory, CLOZE_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "Cloze":
        path = Path(directory, CLOZE_FILE)
        if not path.exists():
            raise HuayuError(f"'{directory}' has no {CLOZE_FILE}: it is not a GLM fine-tuned by huayu finetune-cls")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def parse_verbalizer(specs: list[str], classes: list[str], pattern: str) -> Cloze:
    """A Cloze from `LABEL:WORD` pairs; every class needs a word and every word a class."""
    words = {}
    for spec in specs:
        label, sep, word = spec.partition(":")
        if not sep or not label or not word:
            raise HuayuError(f"--verbalizer takes LABEL:WORD pairs (e.g. 1:好 0:差), got '{spec}'")
        words[label] = word
    missing = [c for c in classes if c not in words]
    if missing:
        raise HuayuError(f"--verbalizer has no word for the label(s) {', '.join(missing)} of the training data "
                         f"({', '.join(classes)}): pass LABEL:WORD for each, e.g. {' '.join(c + ':…' for c in classes)}")
    unknown = sorted(set(words) - set(classes))
    if unknown:
        raise HuayuError(f"--verbalizer names label(s) {', '.join(unknown)} that the training data does not have "
                         f"({', '.join(classes)})")
    if len(set(words.values())) < len(words):
        raise HuayuError("--verbalizer gives two labels the same word: the blank could not tell them apart")
    return Cloze(pattern, list(classes), [words[c] for c in classes])


@dataclass
class ClozeExample:
    input_ids: np.ndarray        # Part A (the filled-in pattern), then one span per candidate
    position_ids: np.ndarray     # (2, length)
    spans: np.ndarray            # 0 in Part A, k in candidate k's span (1-based)
    targets: np.ndarray          # each span's word, aligned; IGNORE in Part A
    label: int = -1


class ClozeEncoder:
    """Texts -> ClozeExamples of at most `max_length` tokens (the text is cut to fit)."""

    def __init__(self, tokenizer, cloze: Cloze, max_length: int):
        from huayu.data.templates import MASK, SOP

        if cloze.pattern.count("{text}") != 1:
            raise HuayuError(f"--pattern must contain {{text}} exactly once, got {cloze.pattern!r}")
        self.tokenizer, self.cloze = tokenizer, cloze
        self.mask, self.sop = tokenizer.convert_tokens_to_ids([MASK, SOP])
        prefix, suffix = cloze.pattern.split("{text}")
        self.prefix, self.suffix = self._ids(prefix), self._ids(suffix)
        if (self.prefix + self.suffix).count(self.mask) != 1:
            raise HuayuError(f"--pattern must contain exactly one {MASK} outside {{text}}, got {cloze.pattern!r}")
        self.words = [self._ids(w) for w in cloze.words]
        for word, ids in zip(cloze.words, self.words):
            if not ids or tokenizer.unk_token_id in ids:
                raise HuayuError(f"the verbalizer word '{word}' is not in the tokenizer's vocabulary: choose another")
        part_b = sum(len(w) for w in self.words)
        self.room = max_length - len(self.prefix) - len(self.suffix) - part_b
        if self.room < 1:
            raise HuayuError(f"--max-length {max_length} leaves no room for the text beside the pattern and "
                             f"the verbalizer ({max_length - self.room} tokens)")
        # Part B, the same for every text: candidate k is <sop> w1 .. w(m-1) predicting w1 .. wm
        self.b_ids = np.concatenate([[self.sop] + w[:-1] for w in self.words]).astype(np.int64)
        self.b_targets = np.concatenate(self.words).astype(np.int64)
        self.b_spans = np.concatenate([np.full(len(w), k + 1) for k, w in enumerate(self.words)])
        self.b_block = np.concatenate([np.arange(1, len(w) + 1) for w in self.words])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[ClozeExample]:
        encoded = plain_ids(self.tokenizer, list(texts))  # a text's "[MASK]" is not the blank
        examples = []
        for i, text_ids in enumerate(encoded):
            part_a = np.asarray(self.prefix + text_ids[:self.room] + self.suffix, dtype=np.int64)
            blank = int(np.flatnonzero(part_a == self.mask)[0])
            n, m = len(part_a), len(self.b_ids)
            positions = np.stack([np.concatenate([np.arange(n), np.full(m, blank)]),
                                  np.concatenate([np.zeros(n, dtype=np.int64), self.b_block])])
            examples.append(ClozeExample(np.concatenate([part_a, self.b_ids]), positions,
                                         np.concatenate([np.zeros(n, dtype=np.int64), self.b_spans]),
                                         np.concatenate([np.full(n, IGNORE), self.b_targets]),
                                         -1 if labels is None else labels[i]))
        return examples


def cloze_collate(pad_id: int):
    """Right-padded batches with the padding mask and an isolated-span (batch, query, key)
    `span_mask`; `labels` (the classes) when every example has one."""
    import torch

    from huayu.models.glm import span_attention_mask

    def collate(examples: list[ClozeExample]) -> dict:
        width = max(len(e.input_ids) for e in examples)
        batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
                 "position_ids": torch.zeros((len(examples), 2, width), dtype=torch.long),
                 "spans": torch.zeros((len(examples), width), dtype=torch.long),
                 "targets": torch.full((len(examples), width), IGNORE, dtype=torch.long)}
        valid = torch.zeros((len(examples), width), dtype=torch.bool)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            batch["input_ids"][row, :n] = torch.from_numpy(e.input_ids)
            batch["position_ids"][row, :, :n] = torch.from_numpy(e.position_ids)
            batch["spans"][row, :n] = torch.from_numpy(e.spans)
            batch["targets"][row, :n] = torch.from_numpy(e.targets)
            valid[row, :n] = True
        batch["attention_mask"] = valid.long()   # what the training loop counts as tokens
        batch["span_mask"] = span_attention_mask(batch["spans"], valid, isolate=True)
        if all(e.label >= 0 for e in examples):
            batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    return collate


def cloze_scores(model, batch: dict) -> "torch.Tensor":
    """(batch, classes) log-likelihoods of each class's word in the blank."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["span_mask"],
                   position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    scored = batch["targets"] != IGNORE
    token = logp.gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0] * scored
    classes = int(batch["spans"].max())
    return torch.zeros(len(token), classes + 1).scatter_add_(1, batch["spans"], token)[:, 1:]


def cloze_forward(model, batch: dict):
    """(cross-entropy over the class scores, the scores) of a batch with labels."""
    import torch

    scores = cloze_scores(model, batch)
    return torch.nn.functional.cross_entropy(scores, batch["labels"]), scores


def cloze_loss(model, batch: dict):
    """The training loop's loss function for cloze fine-tuning."""
    return cloze_forward(model, batch)[0], {}
