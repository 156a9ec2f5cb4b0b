"""`huayu export onnx` and `huayu predict`: run a text classifier with ONNX Runtime or PyTorch.

An exported directory holds model.onnx beside the model's own config, weights and tokenizer, so one
directory serves both backends and either can check the other. Texts are encoded by the helpers
`huayu finetune-cls` trains with, so a deployed classifier sees exactly the inputs it learned on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.classification import (HEADERS, ClassificationExample, Logits, check_known_labels,
                                       classification_collate, encode_texts, predict_probabilities, read_labelled,
                                       text_examples, torch_logits, write_predictions)
from huayu.errors import HuayuError
from huayu.export import OUT_HELP
from huayu.outputs import OVERWRITE_HELP, building, check_output_dir

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BACKENDS = ("onnx", "torch")
TOLERANCE = 1e-4  # max |logit difference| between ONNX Runtime and PyTorch that an export may have
# Texts of different lengths, so the parity batch is padded and checks the attention mask.
PARITY_TEXTS = ["好", "这家酒店很不错。", "房间太小了，服务也一般，不会再来。",
                "物流很快，包装完好，书的内容也很有意思，推荐给喜欢历史的朋友们！"]


def classifier_config(model_dir: str):
    """The config of a sequence-classification model directory; anything else is a HuayuError."""
    from huayu.models.loading import is_classifier, load_config

    if not (Path(model_dir) / "config.json").is_file():
        raise HuayuError(f"'{model_dir}' is not a model directory (it has no config.json)")
    config = load_config(model_dir)
    if not is_classifier(config):
        architectures = config.architectures or []
        raise HuayuError(f"'{model_dir}' is not a text classifier (architectures: {', '.join(architectures) or 'none'};"
                         " expected a ...ForSequenceClassification model, e.g. the output of huayu finetune-cls)")
    return config


def load_classifier(model_dir: str):
    """The PyTorch classifier in fp32 and eval mode (a bf16 checkpoint would not match its fp32 export)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from huayu.models.loading import check_safe_weights, pickle_weights_allowed, remote_code_trusted

    classifier_config(model_dir)
    check_safe_weights(model_dir)
    hf_logging.disable_progress_bar()  # a bar for loading a few MB of weights is noise
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=None if pickle_weights_allowed() else True,
        trust_remote_code=remote_code_trusted()).eval()


def onnx_logits(path: Path) -> Logits:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(batch: dict) -> np.ndarray:
        return session.run(["logits"], {k: batch[k].numpy() for k in INPUTS})[0]

    return logits


def load_backend(model_dir: str, backend: str) -> Logits:
    if backend == "torch":
        return torch_logits(load_classifier(model_dir))
    path = Path(model_dir) / ONNX_FILE
    if not path.is_file():
        raise HuayuError(f"'{model_dir}' has no {ONNX_FILE}: run huayu export onnx {model_dir} --out DIR first "
                         "and predict with DIR, or use --backend torch")
    return onnx_logits(path)


def usable_length(config, max_length: int | None) -> int:
    """`max_length` capped at the model's position embeddings (their number when None)."""
    positions = getattr(config, "max_position_embeddings", None) or max_length or 512
    return min(max_length or positions, positions)


# ---------------------------------------------------------------------------------------------- export onnx


@dataclass
class OnnxConfig:
    model: str = field_doc("text classifier directory (e.g. the output of huayu finetune-cls)", positional=True,
                           default=None)
    out: str = field_doc(OUT_HELP, default=None)
    overwrite: bool = field_doc(OVERWRITE_HELP, default=False)
    opset: int = field_doc("ONNX opset version", default=18)
    max_length: int | None = field_doc("longest input (tokens) of the PyTorch parity check "
                                       "(default and at most: the model's max_position_embeddings)", default=None)


def _export(model, batch: dict, path: Path, opset: int) -> None:
    """model.onnx with dynamic batch and sequence axes, traced on `batch` (both sizes > 1, as export
    specialises sizes 0 and 1). Only the dynamo exporter: the TorchScript one (dynamo=False) exports a
    BERT whose logits are off by ~1e-2 at every shape, padded or not (torch 2.13, transformers 5), which
    the parity check rejects, so it is no fallback."""
    import torch

    class LogitsOnly(torch.nn.Module):  # the three inputs in, the logits tensor out
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    # the exporter logs a warning for every torchvision op it cannot register; huayu never uses them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch_dim, 1: seq_dim} for name in INPUTS}
    with warnings.catch_warnings():  # the three inputs share the two axes, which torch.onnx warns about
        warnings.filterwarnings("ignore", message=r"# The axis name")
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)  # torch's own internals
        try:
            torch.onnx.export(LogitsOnly().eval(), tuple(batch[k] for k in INPUTS), str(path), input_names=INPUTS,
                              output_names=["logits"], dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                              verbose=False)
        except torch.onnx.OnnxExporterError as exc:
            raise HuayuError(f"torch.onnx cannot export {type(model).__name__}: {exc}") from None


def parity_batch(tokenizer, max_length: int) -> dict:
    """PARITY_TEXTS plus one text truncated to `max_length` tokens, padded into one batch (unsorted)."""
    joined = "".join(PARITY_TEXTS)
    texts = PARITY_TEXTS + [joined * (max_length // len(joined) + 1)]
    ids = encode_texts(tokenizer, texts, max_length)
    return classification_collate(tokenizer.pad_token_id)([ClassificationExample(i) for i in ids])


def check_onnx(cfg: OnnxConfig) -> None:
    if not (cfg.model and cfg.out):
        raise HuayuError("usage: huayu export onnx MODEL --out DIR")
    check_output_dir(cfg.out, "export onnx", cfg.overwrite)
    classifier_config(cfg.model)


def export_onnx(cfg: OnnxConfig) -> tuple[Path, float]:
    """Write model.onnx, config, weights and tokenizer into cfg.out; return (cfg.out, the max |logit
    difference| from PyTorch). Built under a temporary name and installed (huayu.outputs) only once the
    logits agree, so a failed or interrupted export leaves nothing behind."""
    from huayu.models.loading import load_tokenizer

    check_onnx(cfg)
    tokenizer, model = load_tokenizer(cfg.model), load_classifier(cfg.model)
    batch = parity_batch(tokenizer, usable_length(model.config, cfg.max_length))
    with building(cfg.out, "export onnx") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _export(model, batch, tmp / ONNX_FILE, cfg.opset)
        diff = float(np.abs(onnx_logits(tmp / ONNX_FILE)(batch) - torch_logits(model)(batch)).max())
        if not diff <= TOLERANCE:  # also catches NaN
            raise HuayuError(f"the ONNX model's logits differ from PyTorch's by up to {diff:.2e} (more than "
                             f"{TOLERANCE:g}): the export is wrong, so nothing was written")
    return Path(cfg.out), diff


def add_onnx_arguments(parser) -> None:
    add_config_arguments(parser, OnnxConfig)


def run_onnx(args) -> None:
    cfg = config_from_args(OnnxConfig, args)
    out, diff = export_onnx(cfg)
    print(f"exported '{cfg.model}' to {out / ONNX_FILE} (opset {cfg.opset}); max |Δlogits| vs PyTorch on a "
          f"padded batch of {len(PARITY_TEXTS) + 1} texts: {diff:.2e}")


# ---------------------------------------------------------------------------------------------- predict


@dataclass
class PredictConfig:
    model: str = field_doc("classifier directory: huayu export onnx's output, or for --backend torch any "
                           "classifier", positional=True, default=None)
    backend: str = field_doc(f"inference backend: {' or '.join(BACKENDS)}", default="onnx")
    input: str = field_doc("TSV/CSV/text file of texts (.csv is comma-separated), - for stdin", default="-")
    text_column: str = field_doc("text column: a header name or a 0-based number", default="text")
    label_column: str | None = field_doc("gold label column (name or 0-based number): prints the accuracy",
                                         default=None)
    header: str = field_doc(f"first line is a header: {'|'.join(HEADERS)}", default="auto")
    batch_size: int = field_doc("texts per batch", default=32)
    max_length: int = field_doc("truncate texts to this many tokens (at most the model's positions)", default=512)
    out: str | None = field_doc("write the predictions here instead of stdout", default=None)


def add_predict_arguments(parser) -> None:
    add_config_arguments(parser, PredictConfig)


def run_predict(args) -> None:
    from huayu.models.loading import load_tokenizer

    cfg = config_from_args(PredictConfig, args)
    if not cfg.model:
        raise HuayuError("usage: huayu predict MODEL [--input FILE]")
    if cfg.backend not in BACKENDS:
        raise HuayuError(f"--backend must be one of {', '.join(BACKENDS)}, got '{cfg.backend}'")
    if cfg.batch_size < 1 or cfg.max_length < 3:
        raise HuayuError("--batch-size must be at least 1 and --max-length at least 3 ([CLS] text [SEP])")
    config = classifier_config(cfg.model)
    logits = load_backend(cfg.model, cfg.backend)  # before reading stdin: a missing model.onnx fails at once
    tokenizer = load_tokenizer(cfg.model)
    data = read_labelled(cfg.input, cfg.text_column, cfg.label_column, cfg.header)
    classes = [config.id2label[i] for i in range(config.num_labels)]
    check_known_labels(data, classes, cfg.input, "the model")
    examples = text_examples(tokenizer, data.texts, usable_length(config, cfg.max_length))
    probs = predict_probabilities(logits, examples, classification_collate(tokenizer.pad_token_id),
                                  config.num_labels, cfg.batch_size)
    write_predictions(cfg.out, classes, probs, data, cfg.input if cfg.input != "-" else "stdin")
