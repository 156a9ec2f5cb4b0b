"""`huayu finetune-cls`: fine-tune an encoder, or a GLM, for text classification from TSV/CSV files.

The encoder (a model huayu pre-trained with `--objective mlm`, a downloaded BERT / ERNIE, or a
preset from random initialisation) gets a sequence-classification head over the training labels.
A GLM fills a blank instead (huayu/data/cloze.py): `--pattern` makes each text a cloze question and
`--verbalizer` names each class's word; the output is a GLM with the cloze recorded in cloze.json.
Every `eval_every` steps the dev set's accuracy, macro-F1 and loss are measured and the best
checkpoint by `best_metric` is kept; it is the final model (PaddleNLP's `load_best_model_at_end`).
`--test` files are predicted with it: `label<TAB>probability<TAB>text` per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.batching import to_device
from huayu.data.classification import HEADERS, Labelled
from huayu.data.cloze import DEFAULT_PATTERN
from huayu.errors import HuayuError
from huayu.train import distributed
from huayu.train.stage import StageConfig, StageData, run_stage

BEST_METRICS = ("accuracy", "macro_f1")
PREDICTIONS = "test_predictions.tsv"


@dataclass
class ClassifyConfig(StageConfig):
    model: str = field_doc("encoder or GLM to fine-tune: a model directory (huayu pretrain --objective mlm or "
                           "blank's output, a downloaded BERT/ERNIE) or a preset (ernie-3.0-nano, glm-nano, ...: "
                           "random init)", positional=True, default=None)
    data: list[str] = field_doc("training file(s): TSV (.tsv/.txt) or CSV (.csv), optionally .gz",
                                aliases=("--train",), default_factory=list)
    valid_data: list[str] = field_doc("dev file(s), evaluated every eval_every steps", aliases=("--dev",),
                                      default_factory=list)
    test: list[str] = field_doc("file(s) to predict with the best model (into OUT/test_predictions.tsv; "
                                "with a label column, their accuracy too)", default_factory=list)
    out: str = field_doc("output directory", default="out/cls")
    text_column: str = field_doc("text column: a header name or a 0-based number", default="text")
    label_column: str = field_doc("label column: a header name or a 0-based number", default="label")
    header: str = field_doc(f"first line is a header: {'|'.join(HEADERS)} (auto: when it names the text column; "
                            "a headerless file is text<TAB>label)", default="auto")
    max_length: int = field_doc("tokens per text, [CLS] and [SEP] included (longer texts are cut)", default=256)
    best_metric: str = field_doc(f"dev metric that picks the best checkpoint: {' | '.join(BEST_METRICS)}",
                                 default="accuracy")
    pattern: str = field_doc("GLM: the cloze question a text becomes, with {text} and one [MASK]",
                             default=DEFAULT_PATTERN)
    verbalizer: list[str] = field_doc("GLM: LABEL:WORD for every class, the word that fills the blank (e.g. 1:好 "
                                      "0:差)", default_factory=list)


def check(cfg: ClassifyConfig) -> None:
    if not cfg.model:
        raise HuayuError("usage: huayu finetune-cls MODEL --train FILE --dev FILE [--test FILE] --out DIR")
    if not cfg.data:
        raise HuayuError("no training data: pass --train FILE")
    if not cfg.valid_data:
        raise HuayuError("no dev data: pass --dev FILE (the best checkpoint is chosen on it)")
    if cfg.best_metric not in BEST_METRICS:
        raise HuayuError(f"--best-metric must be one of {', '.join(BEST_METRICS)}, got '{cfg.best_metric}'")
    if cfg.finetuning.uses_adapter:
        raise HuayuError(f"finetune-cls trains --finetuning-type full or freeze, not {cfg.finetuning.finetuning_type}: "
                         "export onnx and predict need a whole classifier, and a classification adapter cannot be "
                         "merged into one yet")
    if cfg.max_length < 3:
        raise HuayuError("--max-length must be at least 3 ([CLS] text [SEP])")


def read_files(paths: list[str], cfg: ClassifyConfig, labels_optional: bool = False) -> Labelled:
    """The rows of `paths` together (labelled only when every file is); skipped rows
    (--skip-invalid) are reported per file."""
    from huayu.data.classification import read_labelled

    parts = [read_labelled(path, cfg.text_column, cfg.label_column, cfg.header, cfg.skip_invalid, labels_optional)
             for path in paths]
    for path, part in zip(paths, parts):
        if part.skipped:
            print(f"{path}: skipped {part.skipped:,} invalid rows (--skip-invalid)")
    labelled = all(part.labels is not None for part in parts)
    return Labelled([t for part in parts for t in part.texts],
                    [y for part in parts for y in part.labels] if labelled else None)


def encode(tokenizer, data: Labelled, classes: list[str], max_length: int) -> list:
    from huayu.data.classification import ClassificationExample, encode_texts

    index = {c: i for i, c in enumerate(classes)}
    return [ClassificationExample(ids, index[label])
            for ids, label in zip(encode_texts(tokenizer, data.texts, max_length), data.labels)]


def classifier_forward(model, batch: dict):
    """(loss, logits) of a sequence classifier."""
    out = model(**batch)
    return out.loss, out.logits


def dev_metrics(model, examples: list, collate, batch_size: int, num_labels: int,
                forward=classifier_forward) -> dict[str, float]:
    """Accuracy, macro-F1 (the mean over classes of each class's F1) and mean loss on `examples`;
    `forward(model, batch) -> (loss, logits)`."""
    import torch

    confusion = torch.zeros((num_labels, num_labels), dtype=torch.long)  # gold x predicted
    loss_sum = 0.0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start:start + batch_size]), model.device)
        with torch.no_grad():
            loss, logits = forward(model, batch)
        loss_sum += loss.item() * len(batch["labels"])
        batch, predicted = to_device(batch, "cpu"), logits.argmax(dim=-1).cpu()
        confusion += torch.bincount(batch["labels"] * num_labels + predicted,
                                    minlength=num_labels * num_labels).view(num_labels, num_labels)
    true_pos = confusion.diag().double()
    precision = true_pos / confusion.sum(dim=0).clamp(min=1)
    recall = true_pos / confusion.sum(dim=1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(recall))
    return {"accuracy": float(true_pos.sum() / confusion.sum()), "macro_f1": float(f1.mean()),
            "loss": loss_sum / len(examples)}


def is_cloze(cfg: ClassifyConfig) -> bool:
    """Whether MODEL classifies by filling a blank (a GLM)."""
    from huayu.models.families import BLANK, family_of_model

    return family_of_model(cfg.model).layout == BLANK


def stage_data(cfg: ClassifyConfig, tokenizer) -> StageData:
    from huayu.data.classification import check_known_labels, classification_collate, label_vocabulary
    from huayu.data.cloze import ClozeEncoder, cloze_collate, cloze_forward, cloze_loss, parse_verbalizer
    from huayu.train.loop import Evaluation, model_loss

    train, dev = read_files(cfg.data, cfg), read_files(cfg.valid_data, cfg)
    classes = label_vocabulary(train.labels)
    if len(classes) < 2:
        raise HuayuError(f"the training data has a single label ({classes[0]}): a classifier needs at least two")
    check_known_labels(dev, classes, ", ".join(cfg.valid_data), "the training data")
    counts = ", ".join(f"{c} {train.labels.count(c):,}" for c in classes)
    print(f"{len(train.texts):,} training texts ({counts}); {len(dev.texts):,} dev texts")
    if is_cloze(cfg):
        cloze = parse_verbalizer(cfg.verbalizer, classes, cfg.pattern)
        encoder = ClozeEncoder(tokenizer, cloze, cfg.max_length)
        if distributed.is_main():
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            cloze.save(cfg.out)  # beside the model: what predicting with it needs
        train_examples, dev_examples = (encoder.encode(d.texts, [classes.index(y) for y in d.labels])
                                        for d in (train, dev))
        collate, loss_fn, forward, head = cloze_collate(tokenizer.pad_token_id), cloze_loss, cloze_forward, None
    else:
        train_examples = encode(tokenizer, train, classes, cfg.max_length)
        dev_examples = encode(tokenizer, dev, classes, cfg.max_length)
        collate, loss_fn, forward, head = classification_collate(tokenizer.pad_token_id), model_loss, \
            classifier_forward, classes
    evaluation = Evaluation(lambda model: dev_metrics(model, dev_examples, collate, cfg.train.batch_size,
                                                      len(classes), forward), best=cfg.best_metric)
    return StageData(train_examples, dev_examples, collate, loss_fn, evaluation=evaluation, classes=head)


def predict_test(cfg: ClassifyConfig) -> None:
    """Predict the --test files with the final (best) model in cfg.out."""
    import torch

    from huayu.data.classification import (classification_collate, predict_probabilities, text_examples,
                                           torch_logits, write_predictions)
    from huayu.data.cloze import Cloze, ClozeEncoder, cloze_collate, cloze_scores
    from huayu.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.out)
    model = load_model(cfg.out, tokenizer, dtype=torch.float32).eval()
    test = read_files(cfg.test, cfg, labels_optional=True)
    if is_cloze(cfg):
        cloze = Cloze.load(cfg.out)
        classes, collate = cloze.classes, cloze_collate(tokenizer.pad_token_id)
        examples = ClozeEncoder(tokenizer, cloze, cfg.max_length).encode(test.texts)

        def logits(batch):
            with torch.inference_mode():
                return cloze_scores(model, batch).numpy()
    else:
        classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
        examples, collate = text_examples(tokenizer, test.texts, cfg.max_length), \
            classification_collate(tokenizer.pad_token_id)
        logits = torch_logits(model)
    probs = predict_probabilities(logits, examples, collate, len(classes), cfg.train.batch_size)
    write_predictions(str(Path(cfg.out) / PREDICTIONS), classes, probs, test, ", ".join(cfg.test))


def add_arguments(parser) -> None:
    add_config_arguments(parser, ClassifyConfig)


def run(args) -> None:
    cfg = config_from_args(ClassifyConfig, args)
    check(cfg)
    with distributed.session():  # under torchrun: rank 0 predicts, once training is done
        run_stage(cfg, "finetune-cls", lambda tok: stage_data(cfg, tok))
        if cfg.test and distributed.is_main():
            predict_test(cfg)
